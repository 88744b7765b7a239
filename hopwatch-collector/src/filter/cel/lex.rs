//! The CEL subset's tokens: identifiers, numbers, strings and punctuation, with their offsets
//! for error messages.

use super::CelError;

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Tok {
    Ident(String),
    Int(i64),
    Uint(u64),
    Str(String),
    Punct(&'static str),
}

#[derive(Debug)]
pub(super) struct Token {
    pub(super) tok: Tok,
    pub(super) at: usize,
}

const PUNCT: &[&str] = &[
    "&&", "||", "==", "!=", "<=", ">=", "<", ">", "!", "(", ")", "[", "]", ",", ".", "?", ":", "+",
    "-", "*", "/", "%", "{", "}",
];

pub(super) fn lex(src: &str) -> Result<Vec<Token>, CelError> {
    let bytes = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            out.push(Token { tok: Tok::Ident(src[start..i].to_owned()), at: start });
        } else if c.is_ascii_digit() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            let bad = |_| CelError { message: "integer out of range".into(), at: start };
            if i < bytes.len() && (bytes[i] == b'u' || bytes[i] == b'U') {
                out.push(Token { tok: Tok::Uint(src[start..i].parse().map_err(bad)?), at: start });
                i += 1;
            } else {
                out.push(Token { tok: Tok::Int(src[start..i].parse().map_err(bad)?), at: start });
            }
        } else if c == b'"' || c == b'\'' {
            let start = i;
            i += 1;
            let mut s = String::new();
            loop {
                let Some(ch) = src[i..].chars().next() else {
                    return Err(CelError { message: "unterminated string".into(), at: start });
                };
                i += ch.len_utf8();
                match ch {
                    '\\' => {
                        let Some(e) = src[i..].chars().next() else {
                            return Err(CelError {
                                message: "unterminated string".into(),
                                at: start,
                            });
                        };
                        i += e.len_utf8();
                        s.push(match e {
                            'n' => '\n',
                            't' => '\t',
                            'r' => '\r',
                            '\\' | '"' | '\'' => e,
                            other => {
                                return Err(CelError {
                                    message: format!("unsupported escape \\{other}"),
                                    at: i - 2,
                                });
                            }
                        });
                    }
                    _ if ch == char::from(c) => break,
                    _ => s.push(ch),
                }
            }
            out.push(Token { tok: Tok::Str(s), at: start });
        } else if let Some(p) = PUNCT.iter().find(|p| src[i..].starts_with(**p)) {
            out.push(Token { tok: Tok::Punct(p), at: i });
            i += p.len();
        } else {
            let ch = src[i..].chars().next().unwrap_or('?');
            return Err(CelError { message: format!("unexpected character {ch:?}"), at: i });
        }
    }
    Ok(out)
}
