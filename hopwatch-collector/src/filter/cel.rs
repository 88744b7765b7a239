//! A bounded subset of CEL (the Common Expression Language) for Hubble's
//! `FlowFilter.experimental.cel_expression`: boolean expressions over the variable `_flow`, a
//! `flow.Flow` read by protobuf field name, as Hubble evaluates them.
//!
//! Supported:
//! - field paths `_flow.a.b.c` with protobuf field names, checked against `flow.Flow` when the
//!   expression is parsed; an unset field reads as its default (an empty message, 0, "",
//!   false), as in CEL over protobuf; enum fields are integers; `is_reply` (a wrapper) is a bool
//!   or `null`;
//! - literals: strings ('...' or "..."), integers (`42`, `42u`), `true`, `false`, `null`, lists
//!   `[a, b]`; enum constants `Verdict.DROPPED` / `flow.Verdict.DROPPED`;
//! - `==`, `!=`, `<`, `<=`, `>`, `>=` (numbers compare across int and uint), `in` (a list),
//!   `!`, `&&`, `||`, parentheses;
//! - `s.startsWith(x)`, `s.endsWith(x)`, `s.contains(x)`, `s.matches(regex)`, `size(x)` /
//!   `x.size()` of strings and lists, `has(_flow.a.b)`.
//!
//! Anything else (arithmetic, the `?:` operator, macros such as `exists`, timestamps, other
//! variables or functions) is refused when the filter is built, naming what is not supported.
//! An expression that fails while it is evaluated (e.g. comparing a string with a number) does
//! not match, as in Hubble. Expressions are at most [`MAX_LEN`] bytes and [`MAX_DEPTH`] deep.

use hopwatch_proto::{descriptors, flow::Flow};
use prost::Message as _;
use prost_reflect::{
    DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, ReflectMessage as _,
};
use regex::Regex;

use self::lex::{Tok, Token, lex};

mod lex;

/// Longest expression accepted, in bytes.
pub const MAX_LEN: usize = 4096;
/// Deepest nesting of sub-expressions accepted.
pub const MAX_DEPTH: usize = 32;

#[derive(Debug, thiserror::Error)]
#[error("{message} (at byte {at})")]
pub struct CelError {
    message: String,
    at: usize,
}

/// A parsed, checked expression.
#[derive(Debug)]
pub struct Expr {
    root: Node,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    StartsWith,
    EndsWith,
    Contains,
}

#[derive(Debug)]
enum Node {
    Lit(Value),
    /// `_flow` followed by field names (empty: `_flow` itself).
    Path(Vec<String>),
    Has(Vec<String>),
    List(Vec<Node>),
    Not(Box<Node>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Cmp(Cmp, Box<Node>, Box<Node>),
    In(Box<Node>, Box<Node>),
    Call(Method, Box<Node>, Box<Node>),
    Matches(Box<Node>, Regex),
    Size(Box<Node>),
}

/// A value while evaluating.
#[derive(Debug, Clone)]
enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Uint(u64),
    Str(String),
    List(Vec<Value>),
    /// A message: only fields of it can be compared.
    Msg,
}

/// What a sub-expression yields, as far as the parser knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Bool,
    Other,
    /// A path whose type is only known at run time (never: paths are typed) or `null`.
    Dyn,
}

impl Expr {
    pub fn parse(src: &str) -> Result<Self, CelError> {
        if src.len() > MAX_LEN {
            return Err(CelError { message: format!("longer than {MAX_LEN} bytes"), at: MAX_LEN });
        }
        let tokens = lex(src)?;
        let flow = descriptors().get_message_by_name("flow.Flow").expect("flow.Flow in proto/");
        let mut p = Parser { tokens, pos: 0, src_len: src.len(), flow, depth: 0 };
        let (root, ty) = p.expr()?;
        if let Some(t) = p.tokens.get(p.pos) {
            return Err(CelError { message: format!("unexpected {:?}", t.tok), at: t.at });
        }
        if ty == Ty::Other {
            return Err(CelError {
                message: "the expression does not return a bool".into(),
                at: 0,
            });
        }
        Ok(Self { root })
    }

    /// Whether `flow` satisfies the expression (an evaluation error does not match).
    pub fn matches(&self, flow: &Flow) -> bool {
        let desc = descriptors().get_message_by_name("flow.Flow").expect("flow.Flow in proto/");
        let Ok(msg) = DynamicMessage::decode(desc, flow.encode_to_vec().as_slice()) else {
            return false;
        };
        matches!(eval(&self.root, &msg), Ok(Value::Bool(true)))
    }
}

// ---- parser ----

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    src_len: usize,
    flow: MessageDescriptor,
    depth: usize,
}

type Parsed = Result<(Node, Ty), CelError>;

impl Parser {
    fn at(&self) -> usize {
        self.tokens.get(self.pos).map_or(self.src_len, |t| t.at)
    }

    fn err<T>(&self, message: impl Into<String>) -> Result<T, CelError> {
        Err(CelError { message: message.into(), at: self.at() })
    }

    fn peek_punct(&self, p: &str) -> bool {
        matches!(self.tokens.get(self.pos), Some(Token { tok: Tok::Punct(q), .. }) if *q == p)
    }

    fn eat_punct(&mut self, p: &str) -> bool {
        let yes = self.peek_punct(p);
        if yes {
            self.pos += 1;
        }
        yes
    }

    fn expect_punct(&mut self, p: &str) -> Result<(), CelError> {
        if self.eat_punct(p) { Ok(()) } else { self.err(format!("expected {p:?}")) }
    }

    fn ident(&mut self) -> Result<String, CelError> {
        match self.tokens.get(self.pos) {
            Some(Token { tok: Tok::Ident(s), .. }) => {
                let s = s.clone();
                self.pos += 1;
                Ok(s)
            }
            _ => self.err("expected a name"),
        }
    }

    fn expr(&mut self) -> Parsed {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return self.err(format!("nested deeper than {MAX_DEPTH}"));
        }
        let r = self.or();
        self.depth -= 1;
        let r = r?;
        if self.peek_punct("?") {
            return self.err("the ?: operator is not supported");
        }
        Ok(r)
    }

    fn boolean(&self, (n, ty): (Node, Ty), op: &str) -> Result<Node, CelError> {
        if ty == Ty::Other {
            return self.err(format!("{op} needs bool operands"));
        }
        Ok(n)
    }

    fn or(&mut self) -> Parsed {
        let mut left = self.and()?;
        while self.eat_punct("||") {
            let l = self.boolean(left, "||")?;
            let r = self.and()?;
            let r = self.boolean(r, "||")?;
            left = (Node::Or(Box::new(l), Box::new(r)), Ty::Bool);
        }
        Ok(left)
    }

    fn and(&mut self) -> Parsed {
        let mut left = self.relation()?;
        while self.eat_punct("&&") {
            let l = self.boolean(left, "&&")?;
            let r = self.relation()?;
            let r = self.boolean(r, "&&")?;
            left = (Node::And(Box::new(l), Box::new(r)), Ty::Bool);
        }
        Ok(left)
    }

    fn relation(&mut self) -> Parsed {
        let (left, lty) = self.unary()?;
        let op = match self.tokens.get(self.pos) {
            Some(Token { tok: Tok::Punct(p), .. }) => match *p {
                "==" => Some(Cmp::Eq),
                "!=" => Some(Cmp::Ne),
                "<" => Some(Cmp::Lt),
                "<=" => Some(Cmp::Le),
                ">" => Some(Cmp::Gt),
                ">=" => Some(Cmp::Ge),
                "+" | "-" | "*" | "/" | "%" => return self.err("arithmetic is not supported"),
                _ => None,
            },
            Some(Token { tok: Tok::Ident(s), .. }) if s == "in" => {
                self.pos += 1;
                let (right, _) = self.unary()?;
                return Ok((Node::In(Box::new(left), Box::new(right)), Ty::Bool));
            }
            _ => None,
        };
        let Some(op) = op else { return Ok((left, lty)) };
        self.pos += 1;
        let (right, _) = self.unary()?;
        Ok((Node::Cmp(op, Box::new(left), Box::new(right)), Ty::Bool))
    }

    fn unary(&mut self) -> Parsed {
        if self.eat_punct("!") {
            let inner = self.unary()?;
            let n = self.boolean(inner, "!")?;
            return Ok((Node::Not(Box::new(n)), Ty::Bool));
        }
        if self.peek_punct("-") {
            // A negative literal.
            self.pos += 1;
            return match self.tokens.get(self.pos) {
                Some(Token { tok: Tok::Int(n), .. }) => {
                    let n = *n;
                    self.pos += 1;
                    Ok((Node::Lit(Value::Int(-n)), Ty::Other))
                }
                _ => self.err("arithmetic is not supported"),
            };
        }
        self.member()
    }

    fn member(&mut self) -> Parsed {
        let (mut node, mut ty) = self.primary()?;
        while self.eat_punct(".") {
            let name = self.ident()?;
            if !self.peek_punct("(") {
                return self.err(format!("field .{name} of something that is not _flow"));
            }
            self.pos += 1;
            let method = match name.as_str() {
                "startsWith" => Some(Method::StartsWith),
                "endsWith" => Some(Method::EndsWith),
                "contains" => Some(Method::Contains),
                "matches" | "size" => None,
                other => return self.err(format!("method {other}() is not supported")),
            };
            if name == "size" {
                self.expect_punct(")")?;
                node = Node::Size(Box::new(node));
                ty = Ty::Other;
                continue;
            }
            let (arg, _) = self.expr()?;
            self.expect_punct(")")?;
            node = match (method, arg) {
                (Some(m), arg) => Node::Call(m, Box::new(node), Box::new(arg)),
                (None, Node::Lit(Value::Str(re))) => {
                    let re = Regex::new(&re).map_err(|e| CelError {
                        message: format!("invalid regular expression: {e}"),
                        at: self.at(),
                    })?;
                    Node::Matches(Box::new(node), re)
                }
                (None, _) => return self.err("matches() takes a string literal"),
            };
            ty = Ty::Bool;
        }
        Ok((node, ty))
    }

    fn primary(&mut self) -> Parsed {
        let Some(t) = self.tokens.get(self.pos) else { return self.err("unexpected end") };
        let tok = t.tok.clone();
        self.pos += 1;
        match tok {
            Tok::Int(n) => Ok((Node::Lit(Value::Int(n)), Ty::Other)),
            Tok::Uint(n) => Ok((Node::Lit(Value::Uint(n)), Ty::Other)),
            Tok::Str(s) => Ok((Node::Lit(Value::Str(s)), Ty::Other)),
            Tok::Punct("(") => {
                let r = self.expr()?;
                self.expect_punct(")")?;
                Ok(r)
            }
            Tok::Punct("[") => {
                let mut items = Vec::new();
                if !self.eat_punct("]") {
                    loop {
                        items.push(self.expr()?.0);
                        if self.eat_punct("]") {
                            break;
                        }
                        self.expect_punct(",")?;
                    }
                }
                Ok((Node::List(items), Ty::Other))
            }
            Tok::Punct(p) => {
                self.pos -= 1;
                self.err(format!("unexpected {p:?}"))
            }
            Tok::Ident(id) => match id.as_str() {
                "true" => Ok((Node::Lit(Value::Bool(true)), Ty::Bool)),
                "false" => Ok((Node::Lit(Value::Bool(false)), Ty::Bool)),
                "null" => Ok((Node::Lit(Value::Null), Ty::Dyn)),
                "_flow" => {
                    let (path, ty) = self.path()?;
                    Ok((Node::Path(path), ty))
                }
                "has" | "size" => {
                    self.expect_punct("(")?;
                    let r = if id == "has" {
                        let at = self.at();
                        if self.ident()? != "_flow" || !self.peek_punct(".") {
                            return Err(CelError {
                                message: "has() takes a field of _flow".into(),
                                at,
                            });
                        }
                        (Node::Has(self.path()?.0), Ty::Bool)
                    } else {
                        (Node::Size(Box::new(self.expr()?.0)), Ty::Other)
                    };
                    self.expect_punct(")")?;
                    Ok(r)
                }
                _ => self.enum_constant(id),
            },
        }
    }

    /// `.a.b.c` after `_flow`, checked against the message types.
    fn path(&mut self) -> Result<(Vec<String>, Ty), CelError> {
        let mut msg = self.flow.clone();
        let mut names = Vec::new();
        let mut ty = Ty::Other;
        while self.peek_punct(".")
            && matches!(self.tokens.get(self.pos + 1), Some(Token { tok: Tok::Ident(_), .. }))
            && !self.peek_punct_at(self.pos + 2, "(")
        {
            self.pos += 1;
            let at = self.at();
            let name = self.ident()?;
            let Some(field) = msg.get_field_by_name(&name) else {
                return Err(CelError {
                    message: format!("{} has no field {name}", msg.full_name()),
                    at,
                });
            };
            ty = field_ty(&field);
            names.push(name);
            match field.kind() {
                Kind::Message(m) if !field.is_list() && !field.is_map() => msg = m,
                _ => {
                    if self.peek_punct(".") && !self.peek_punct_at(self.pos + 2, "(") {
                        return self.err(format!("{} is not a message", names.join(".")));
                    }
                    break;
                }
            }
        }
        Ok((names, ty))
    }

    fn peek_punct_at(&self, pos: usize, p: &str) -> bool {
        matches!(self.tokens.get(pos), Some(Token { tok: Tok::Punct(q), .. }) if *q == p)
    }

    /// `Verdict.DROPPED` or `flow.Verdict.DROPPED`.
    fn enum_constant(&mut self, first: String) -> Parsed {
        let mut parts = vec![first];
        while self.peek_punct(".")
            && matches!(self.tokens.get(self.pos + 1), Some(Token { tok: Tok::Ident(_), .. }))
        {
            self.pos += 1;
            parts.push(self.ident()?);
        }
        let at = self.tokens.get(self.pos.saturating_sub(1)).map_or(0, |t| t.at);
        let unsupported = || CelError {
            message: format!(
                "{} is not supported (only _flow, has(), size() and enum constants)",
                parts.join(".")
            ),
            at,
        };
        let Some((value, ty_parts)) = parts.split_last() else { return Err(unsupported()) };
        let mut name = ty_parts.join(".");
        if !name.starts_with("flow.") {
            name = format!("flow.{name}");
        }
        let e = descriptors().get_enum_by_name(&name).ok_or_else(unsupported)?;
        let v = e.get_value_by_name(value).ok_or_else(unsupported)?;
        Ok((Node::Lit(Value::Int(i64::from(v.number()))), Ty::Other))
    }
}

fn field_ty(f: &FieldDescriptor) -> Ty {
    if f.is_list() {
        return Ty::Other;
    }
    match f.kind() {
        Kind::Bool => Ty::Bool,
        Kind::Message(m) if m.full_name() == "google.protobuf.BoolValue" => Ty::Bool,
        _ => Ty::Other,
    }
}

// ---- evaluation ----

struct EvalError;

fn eval(n: &Node, flow: &DynamicMessage) -> Result<Value, EvalError> {
    Ok(match n {
        Node::Lit(v) => v.clone(),
        Node::Path(names) => read(flow, names)?,
        Node::Has(names) => Value::Bool(has(flow, names)),
        Node::List(items) => {
            Value::List(items.iter().map(|i| eval(i, flow)).collect::<Result<_, _>>()?)
        }
        Node::Not(a) => Value::Bool(!truth(eval(a, flow))?),
        Node::And(a, b) => match (truth(eval(a, flow)), truth(eval(b, flow))) {
            (Ok(false), _) | (_, Ok(false)) => Value::Bool(false),
            (Ok(true), Ok(true)) => Value::Bool(true),
            _ => return Err(EvalError),
        },
        Node::Or(a, b) => match (truth(eval(a, flow)), truth(eval(b, flow))) {
            (Ok(true), _) | (_, Ok(true)) => Value::Bool(true),
            (Ok(false), Ok(false)) => Value::Bool(false),
            _ => return Err(EvalError),
        },
        Node::Cmp(op, a, b) => {
            let (a, b) = (eval(a, flow)?, eval(b, flow)?);
            Value::Bool(compare(*op, &a, &b)?)
        }
        Node::In(a, b) => {
            let a = eval(a, flow)?;
            let Value::List(items) = eval(b, flow)? else { return Err(EvalError) };
            let mut found = false;
            for i in &items {
                if compare(Cmp::Eq, &a, i)? {
                    found = true;
                    break;
                }
            }
            Value::Bool(found)
        }
        Node::Call(m, recv, arg) => {
            let (Value::Str(s), Value::Str(x)) = (eval(recv, flow)?, eval(arg, flow)?) else {
                return Err(EvalError);
            };
            Value::Bool(match m {
                Method::StartsWith => s.starts_with(&x),
                Method::EndsWith => s.ends_with(&x),
                Method::Contains => s.contains(&x),
            })
        }
        Node::Matches(recv, re) => match eval(recv, flow)? {
            Value::Str(s) => Value::Bool(re.is_match(&s)),
            _ => return Err(EvalError),
        },
        Node::Size(a) => match eval(a, flow)? {
            Value::Str(s) => Value::Int(i64::try_from(s.chars().count()).unwrap_or(i64::MAX)),
            Value::List(l) => Value::Int(i64::try_from(l.len()).unwrap_or(i64::MAX)),
            _ => return Err(EvalError),
        },
    })
}

fn truth(v: Result<Value, EvalError>) -> Result<bool, EvalError> {
    match v? {
        Value::Bool(b) => Ok(b),
        _ => Err(EvalError),
    }
}

fn compare(op: Cmp, a: &Value, b: &Value) -> Result<bool, EvalError> {
    use std::cmp::Ordering;
    let ord: Option<Ordering> = match (a, b) {
        (Value::Int(x), Value::Int(y)) => Some(x.cmp(y)),
        (Value::Uint(x), Value::Uint(y)) => Some(x.cmp(y)),
        (Value::Int(x), Value::Uint(y)) => {
            Some(u64::try_from(*x).map_or(Ordering::Less, |x| x.cmp(y)))
        }
        (Value::Uint(x), Value::Int(y)) => {
            Some(u64::try_from(*y).map_or(Ordering::Greater, |y| x.cmp(&y)))
        }
        (Value::Str(x), Value::Str(y)) => Some(x.cmp(y)),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        (Value::Null, Value::Null) => Some(Ordering::Equal),
        // null against a value: only equality is defined.
        (Value::Null, _) | (_, Value::Null) => None,
        (Value::List(x), Value::List(y)) => {
            if !matches!(op, Cmp::Eq | Cmp::Ne) {
                return Err(EvalError);
            }
            let mut same = x.len() == y.len();
            for (i, j) in x.iter().zip(y) {
                same = same && compare(Cmp::Eq, i, j)?;
            }
            return Ok(same == (op == Cmp::Eq));
        }
        _ => return Err(EvalError),
    };
    match (op, ord) {
        (Cmp::Eq, o) => Ok(o == Some(Ordering::Equal)),
        (Cmp::Ne, o) => Ok(o != Some(Ordering::Equal)),
        (_, None) => Err(EvalError),
        (Cmp::Lt, Some(o)) => Ok(o == Ordering::Less),
        (Cmp::Le, Some(o)) => Ok(o != Ordering::Greater),
        (Cmp::Gt, Some(o)) => Ok(o == Ordering::Greater),
        (Cmp::Ge, Some(o)) => Ok(o != Ordering::Less),
    }
}

fn read(flow: &DynamicMessage, names: &[String]) -> Result<Value, EvalError> {
    let mut msg = flow.clone();
    let Some((last, parents)) = names.split_last() else { return Ok(Value::Msg) };
    for name in parents {
        match msg.get_field_by_name(name).as_deref() {
            Some(prost_reflect::Value::Message(m)) => msg = m.clone(),
            _ => return Err(EvalError),
        }
    }
    let field = msg.descriptor().get_field_by_name(last).ok_or(EvalError)?;
    // A wrapper that is not set is null, as in CEL over protobuf.
    if field.kind().as_message().is_some_and(|m| m.full_name() == "google.protobuf.BoolValue")
        && !msg.has_field(&field)
    {
        return Ok(Value::Null);
    }
    convert(&msg.get_field(&field))
}

fn convert(v: &prost_reflect::Value) -> Result<Value, EvalError> {
    use prost_reflect::Value as V;
    Ok(match v {
        V::Bool(b) => Value::Bool(*b),
        V::I32(n) | V::EnumNumber(n) => Value::Int(i64::from(*n)),
        V::I64(n) => Value::Int(*n),
        V::U32(n) => Value::Uint(u64::from(*n)),
        V::U64(n) => Value::Uint(*n),
        V::String(s) => Value::Str(s.clone()),
        V::List(items) => Value::List(items.iter().map(convert).collect::<Result<_, _>>()?),
        V::Message(m) if m.descriptor().full_name() == "google.protobuf.BoolValue" => {
            match m.get_field_by_name("value").as_deref() {
                Some(V::Bool(b)) => Value::Bool(*b),
                _ => Value::Bool(false),
            }
        }
        V::Message(_) => Value::Msg,
        V::F32(_) | V::F64(_) | V::Bytes(_) | V::Map(_) => return Err(EvalError),
    })
}

fn has(flow: &DynamicMessage, names: &[String]) -> bool {
    let mut msg = flow.clone();
    let Some((last, parents)) = names.split_last() else { return true };
    for name in parents {
        let Some(f) = msg.descriptor().get_field_by_name(name) else { return false };
        if !msg.has_field(&f) {
            return false;
        }
        match msg.get_field(&f).as_ref() {
            prost_reflect::Value::Message(m) => msg = m.clone(),
            _ => return false,
        }
    }
    msg.descriptor().get_field_by_name(last).is_some_and(|f| msg.has_field(&f))
}

#[cfg(test)]
mod tests {
    use hopwatch_proto::flow::{Endpoint, Ip, Verdict};

    use super::*;

    fn flow() -> Flow {
        Flow {
            verdict: Verdict::Dropped.into(),
            node_name: "node-a".into(),
            source: Some(Endpoint {
                namespace: "shop".into(),
                labels: vec!["k8s:app=web".into()],
                ..Endpoint::default()
            }),
            ip: Some(Ip { source: "10.0.0.1".into(), ..Ip::default() }),
            kernel_drop_reason: "NETFILTER_DROP".into(),
            ..Flow::default()
        }
    }

    fn eval_on(src: &str, f: &Flow) -> bool {
        Expr::parse(src).unwrap_or_else(|e| panic!("{src}: {e}")).matches(f)
    }

    #[test]
    fn supported_expressions_select_what_they_say() {
        let f = flow();
        for (src, want) in [
            ("_flow.verdict == Verdict.DROPPED", true),
            ("_flow.verdict == flow.Verdict.FORWARDED", false),
            ("_flow.verdict == 2", true),
            ("_flow.source.namespace == 'shop' && _flow.node_name.startsWith(\"node-\")", true),
            ("_flow.destination.namespace == ''", true),
            ("!(_flow.source.namespace in ['a', 'b'])", true),
            ("'k8s:app=web' in _flow.source.labels", true),
            ("size(_flow.source.labels) == 1 && _flow.source.labels.size() >= 1", true),
            ("_flow.IP.source.matches('^10\\\\.0\\\\.')", true),
            ("_flow.kernel_drop_reason.contains('FILTER') || false", true),
            ("has(_flow.source.namespace) && !has(_flow.destination)", true),
            ("_flow.is_reply == null", true),
            ("_flow.socket_cookie > 0u", false),
            ("_flow.socket_cookie >= 0", true),
            // An evaluation error does not match, even negated.
            ("!(_flow.node_name > 3)", false),
        ] {
            assert_eq!(eval_on(src, &f), want, "{src}");
        }
    }

    #[test]
    fn unsupported_or_invalid_expressions_are_refused() {
        for (src, why) in [
            ("_flow.verdict + 1 == 3", "arithmetic"),
            ("_flow.source.nope == 1", "has no field nope"),
            ("_flow.node_name", "does not return a bool"),
            ("_flow.verdict == 1 ? true : false", "?:"),
            ("_flow.source.labels.exists(l, l == 'x')", "exists() is not supported"),
            ("now() > 1", "not supported"),
            ("_flow.node_name == 'x", "unterminated"),
            ("_flow.node_name.matches('(')", "invalid regular expression"),
            ("_flow.node_name.x.y == 1", "not a message"),
        ] {
            let err = Expr::parse(src).expect_err(src).to_string();
            assert!(err.contains(why), "{src}: {err}");
        }
        let deep = format!("{}true{}", "(".repeat(40), ")".repeat(40));
        assert!(Expr::parse(&deep).unwrap_err().to_string().contains("nested deeper"));
    }
}
