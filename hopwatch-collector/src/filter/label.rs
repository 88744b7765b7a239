//! Kubernetes label selectors, as Hubble's `--label` filters take them:
//! `app=web`, `app==web`, `app!=web`, `env in (prod, staging)`, `env notin (dev)`, `canary`,
//! `!canary`, joined by commas (AND).
//!
//! Flow labels are `key=value` strings, optionally with a Cilium-style source prefix
//! (`k8s:app=web`). A selector key without a source matches a label key with any source; a key
//! with one (`k8s:app`) matches only that source.

use super::FilterError;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Exists,
    NotExists,
    Equals(String),
    NotEquals(String),
    In(Vec<String>),
    NotIn(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Requirement {
    key: String,
    op: Op,
}

/// A parsed selector: every requirement must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    pub(super) fn parse(field: &'static str, s: &str) -> Result<Self, FilterError> {
        let bad = |reason: &str| FilterError::Invalid {
            field,
            value: s.to_owned(),
            reason: reason.to_owned(),
        };
        let mut requirements = Vec::new();
        for term in split_top_level(s).map_err(bad)? {
            let term = term.trim();
            if term.is_empty() {
                return Err(bad("empty requirement"));
            }
            requirements.push(parse_requirement(term).map_err(bad)?);
        }
        Ok(Self { requirements })
    }

    /// Whether `labels` (`key=value` or `source:key=value` strings) satisfy the selector.
    pub(super) fn matches(&self, labels: &[String]) -> bool {
        self.requirements.iter().all(|r| {
            let mut values = labels.iter().filter_map(|l| {
                let (k, v) = l.split_once('=').unwrap_or((l.as_str(), ""));
                key_matches(&r.key, k).then_some(v)
            });
            match &r.op {
                Op::Exists => values.next().is_some(),
                Op::NotExists => values.next().is_none(),
                Op::Equals(want) => values.any(|v| v == want),
                // Kubernetes semantics: a missing key satisfies != and notin.
                Op::NotEquals(want) => values.all(|v| v != want),
                Op::In(set) => values.any(|v| set.iter().any(|w| w == v)),
                Op::NotIn(set) => values.all(|v| set.iter().all(|w| w != v)),
            }
        })
    }
}

fn key_matches(selector_key: &str, label_key: &str) -> bool {
    if selector_key.contains(':') {
        return selector_key == label_key;
    }
    let bare = label_key.split_once(':').map_or(label_key, |(_, k)| k);
    bare == selector_key
}

/// Splits on commas outside parentheses.
fn split_top_level(s: &str) -> Result<Vec<&str>, &'static str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err("unbalanced parentheses");
                }
            }
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced parentheses");
    }
    parts.push(&s[start..]);
    Ok(parts)
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':'))
}

fn valid_value(v: &str) -> bool {
    v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn parse_requirement(term: &str) -> Result<Requirement, &'static str> {
    if let Some(key) = term.strip_prefix('!') {
        let key = key.trim();
        return if valid_key(key) {
            Ok(Requirement { key: key.to_owned(), op: Op::NotExists })
        } else {
            Err("invalid label key")
        };
    }
    for (sep, make) in [
        ("!=", Op::NotEquals as fn(String) -> Op),
        ("==", Op::Equals as fn(String) -> Op),
        ("=", Op::Equals as fn(String) -> Op),
    ] {
        if let Some((k, v)) = term.split_once(sep) {
            let (k, v) = (k.trim(), v.trim());
            if !valid_key(k) {
                return Err("invalid label key");
            }
            if !valid_value(v) {
                return Err("invalid label value");
            }
            return Ok(Requirement { key: k.to_owned(), op: make(v.to_owned()) });
        }
    }
    let words: Vec<&str> = term.splitn(2, char::is_whitespace).collect();
    if let [key, rest] = words[..] {
        let rest = rest.trim_start();
        let (negate, list) = if let Some(l) = rest.strip_prefix("notin") {
            (true, l)
        } else if let Some(l) = rest.strip_prefix("in") {
            (false, l)
        } else {
            return Err("expected =, ==, !=, in or notin");
        };
        let inner = list
            .trim()
            .strip_prefix('(')
            .and_then(|l| l.strip_suffix(')'))
            .ok_or("a set must be written as (a, b)")?;
        let values: Vec<String> = inner.split(',').map(|v| v.trim().to_owned()).collect();
        if !valid_key(key) {
            return Err("invalid label key");
        }
        if values.iter().any(|v| v.is_empty() || !valid_value(v)) {
            return Err("invalid value in set");
        }
        let op = if negate { Op::NotIn(values) } else { Op::In(values) };
        return Ok(Requirement { key: key.to_owned(), op });
    }
    if valid_key(term) {
        Ok(Requirement { key: term.to_owned(), op: Op::Exists })
    } else {
        Err("invalid label key")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn selectors_follow_kubernetes_semantics() {
        let web = labels(&["k8s:app=web", "k8s:env=prod", "canary"]);
        let db = labels(&["app=db", "env=dev"]);
        let cases: &[(&str, bool, bool)] = &[
            // (selector, matches web, matches db)
            ("app=web", true, false),
            ("app==web", true, false),
            ("k8s:app=web", true, false),
            ("k8s:app=db", false, false),
            ("app!=web", false, true),
            ("missing!=x", true, true),
            ("env in (prod, staging)", true, false),
            ("env notin (prod)", false, true),
            ("missing notin (a)", true, true),
            ("canary", true, false),
            ("!canary", false, true),
            ("app=web,env=prod", true, false),
            ("app=web,env=dev", false, false),
            ("app", true, true),
        ];
        for (sel, want_web, want_db) in cases {
            let s = Selector::parse("source_label", sel).expect(sel);
            assert_eq!(s.matches(&web), *want_web, "{sel} on web");
            assert_eq!(s.matches(&db), *want_db, "{sel} on db");
        }
    }

    #[test]
    fn rejects_malformed_selectors() {
        for bad in ["", "app=", "=web", "env in prod", "env in (a", "a b", "app=w b", "x,,y"] {
            // "app=" is a valid selector in Kubernetes (empty value); accept it.
            if bad == "app=" {
                assert!(Selector::parse("l", bad).is_ok());
                continue;
            }
            let err = Selector::parse("source_label", bad).expect_err(bad);
            assert!(err.to_string().contains("source_label"), "{err}");
        }
    }
}
