//! Redaction of SQL statements: literals become `?`, everything else keeps its shape.
#![expect(clippy::doc_markdown, reason = "PostgreSQL and MySQL are product names, not code")]
//!
//! A single pass over the bytes, without a parser: string literals (`'..'` with `''` and, where
//! the dialect has them, backslash escapes; PostgreSQL `E'..'`, `U&'..'`, `$tag$..$tag$`; MySQL
//! `".."`), numbers, and hex/bit literals (`X'..'`, `B'..'`, `0x..`, `0b..`) become `?`.
//! Identifiers (also quoted ones: `"..."` in PostgreSQL, `` `...` `` in MySQL), keywords,
//! operators and placeholders (`$1`, `?`, `:name`, `@var`) are kept. Comments are dropped (they may
//! hold anything) and runs of whitespace become one space, so equal statements read alike.
//! The output is capped at [`MAX_TEXT`] bytes and is always valid UTF-8.

use super::MAX_TEXT;

/// Which quoting rules apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `"` quotes identifiers; backslashes are literal except in `E'..'`; `$tag$` strings.
    Postgres,
    /// `"` quotes strings; backslash escapes in strings; `` ` `` quotes identifiers; `#` comments.
    Mysql,
}

/// `sql` with its literals replaced by `?`, at most [`MAX_TEXT`] bytes.
pub fn redact(sql: &[u8], dialect: Dialect) -> String {
    let mut out = Vec::with_capacity(sql.len().min(MAX_TEXT));
    let mut i = 0;
    // Whether the last byte written is whitespace (or nothing was written yet), so a run of
    // whitespace and dropped comments collapses into one space.
    let mut after_space = true;
    while i < sql.len() && out.len() < MAX_TEXT {
        let c = sql[i];
        let next = sql.get(i + 1).copied();
        // Whitespace and comments.
        if c.is_ascii_whitespace()
            || (c == b'-' && next == Some(b'-'))
            || (c == b'/' && next == Some(b'*'))
            || (c == b'#' && dialect == Dialect::Mysql)
        {
            i = skip_space_or_comment(sql, i, dialect);
            if !after_space {
                out.push(b' ');
                after_space = true;
            }
            continue;
        }
        after_space = false;
        let prev_ident = i > 0 && is_ident_byte(sql[i - 1]);
        match c {
            b'\'' => {
                i = skip_quoted(sql, i + 1, b'\'', dialect == Dialect::Mysql);
                out.push(b'?');
            }
            b'"' if dialect == Dialect::Mysql => {
                i = skip_quoted(sql, i + 1, b'"', true);
                out.push(b'?');
            }
            b'"' | b'`' => {
                // Quoted identifier: kept as written.
                let end = skip_quoted(sql, i + 1, c, false);
                out.extend_from_slice(&sql[i..end]);
                i = end;
            }
            // Prefixed strings: E'..', X'..', B'..', N'..' (and U&'..' below). The prefix is part
            // of the literal only when it does not end an identifier (`namE'x'` is not valid SQL,
            // but `some_e'..'` must not lose its `e`).
            b'e' | b'E' | b'x' | b'X' | b'b' | b'B' | b'n' | b'N'
                if next == Some(b'\'') && !prev_ident =>
            {
                let backslashes = dialect == Dialect::Mysql
                    || matches!(c, b'e' | b'E')
                    || matches!(c, b'n' | b'N');
                i = skip_quoted(sql, i + 2, b'\'', backslashes);
                out.push(b'?');
            }
            b'u' | b'U' if next == Some(b'&') && sql.get(i + 2) == Some(&b'\'') && !prev_ident => {
                i = skip_quoted(sql, i + 3, b'\'', false);
                out.push(b'?');
            }
            b'$' if dialect == Dialect::Postgres => {
                if let Some(end) = dollar_quoted(sql, i) {
                    i = end;
                    out.push(b'?');
                } else {
                    // `$1` placeholders and `$` inside identifiers are kept.
                    out.push(c);
                    i += 1;
                    while i < sql.len() && sql[i].is_ascii_digit() {
                        out.push(sql[i]);
                        i += 1;
                    }
                }
            }
            b'0'..=b'9' if !prev_ident => {
                i = skip_number(sql, i);
                out.push(b'?');
            }
            b'.' if !prev_ident && next.is_some_and(|n| n.is_ascii_digit()) => {
                i = skip_number(sql, i);
                out.push(b'?');
            }
            _ if is_ident_byte(c) => {
                // A whole identifier or keyword at once, so digits inside it stay.
                let start = i;
                while i < sql.len() && is_ident_byte(sql[i]) {
                    i += 1;
                }
                out.extend_from_slice(&sql[start..i]);
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    if out.last() == Some(&b' ') {
        out.pop();
    }
    into_capped_string(out)
}

/// `text` as a string of at most [`MAX_TEXT`] bytes: invalid UTF-8 is replaced, the cut falls on
/// a character boundary.
pub fn capped_text(text: &[u8]) -> String {
    into_capped_string(text[..text.len().min(MAX_TEXT)].to_vec())
}

fn into_capped_string(bytes: Vec<u8>) -> String {
    let s = match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    };
    cap(s)
}

/// `s` cut to at most [`MAX_TEXT`] bytes, on a character boundary.
pub fn cap(mut s: String) -> String {
    if s.len() > MAX_TEXT {
        let mut cut = MAX_TEXT;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

fn is_ident_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

/// Index after the whitespace or comment starting at `i`.
fn skip_space_or_comment(sql: &[u8], mut i: usize, dialect: Dialect) -> usize {
    let c = sql[i];
    if c.is_ascii_whitespace() {
        return i + 1;
    }
    if c == b'/' {
        // Block comment; PostgreSQL nests them. Unterminated: runs to the end.
        let mut depth = 0usize;
        while i < sql.len() {
            if sql[i] == b'/' && sql.get(i + 1) == Some(&b'*') {
                depth += 1;
                i += 2;
            } else if sql[i] == b'*' && sql.get(i + 1) == Some(&b'/') {
                depth -= 1;
                i += 2;
                if depth == 0 || dialect == Dialect::Mysql {
                    return i;
                }
            } else {
                i += 1;
            }
        }
        return i;
    }
    // `--` or `#`: to the end of the line.
    sql[i..].iter().position(|&b| b == b'\n').map_or(sql.len(), |p| i + p + 1)
}

/// Index after the closing `quote` of a literal whose body starts at `i`; a doubled quote is an
/// escaped quote, and so is a backslash-escaped one when `backslashes`. Unterminated literals
/// (a truncated capture) run to the end.
fn skip_quoted(sql: &[u8], mut i: usize, quote: u8, backslashes: bool) -> usize {
    while i < sql.len() {
        let c = sql[i];
        if backslashes && c == b'\\' {
            i += 2;
        } else if c == quote {
            if sql.get(i + 1) == Some(&quote) {
                i += 2;
            } else {
                return i + 1;
            }
        } else {
            i += 1;
        }
    }
    sql.len()
}

/// End of a `$tag$ ... $tag$` string starting at `i`, or `None` if `$` does not open one.
fn dollar_quoted(sql: &[u8], i: usize) -> Option<usize> {
    let tag_len = sql[i + 1..].iter().position(|&b| b == b'$')?;
    let tag = &sql[i + 1..i + 1 + tag_len];
    // A tag is an identifier that does not start with a digit (so `$1` is a placeholder).
    if tag.first().is_some_and(u8::is_ascii_digit)
        || !tag.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80)
    {
        return None;
    }
    let delim = &sql[i..i + tag_len + 2];
    let body = i + delim.len();
    let end = sql[body..].windows(delim.len()).position(|w| w == delim);
    Some(end.map_or(sql.len(), |p| body + p + delim.len()))
}

/// Index after the numeric literal starting at `i` (`12`, `1.5e-3`, `.5`, `0x1F`, `0b101`).
fn skip_number(sql: &[u8], mut i: usize) -> usize {
    if sql[i] == b'0' && matches!(sql.get(i + 1), Some(b'x' | b'X' | b'b' | b'B')) {
        i += 2;
        while i < sql.len() && sql[i].is_ascii_hexdigit() {
            i += 1;
        }
        return i;
    }
    while i < sql.len() && (sql[i].is_ascii_digit() || sql[i] == b'.' || sql[i] == b'_') {
        i += 1;
    }
    if i < sql.len() && matches!(sql[i], b'e' | b'E') {
        let mut j = i + 1;
        if j < sql.len() && matches!(sql[j], b'+' | b'-') {
            j += 1;
        }
        if j < sql.len() && sql[j].is_ascii_digit() {
            i = j;
            while i < sql.len() && sql[i].is_ascii_digit() {
                i += 1;
            }
        }
    }
    i
}

#[cfg(test)]
mod tests {
    use super::{Dialect::*, *};

    #[test]
    fn literals_become_placeholders() {
        let cases: &[(&str, super::Dialect, &str)] = &[
            (
                "SELECT * FROM t WHERE a = 'x' AND b = 42",
                Postgres,
                "SELECT * FROM t WHERE a = ? AND b = ?",
            ),
            ("SELECT 'it''s', E'a\\'b', 'c'", Postgres, "SELECT ?, ?, ?"),
            ("SELECT $$a 'b' c$$, $fn$x$fn$ FROM t", Postgres, "SELECT ?, ? FROM t"),
            ("SELECT $1::int + 1.5e3, .5, -7", Postgres, "SELECT $1::int + ?, ?, -?"),
            ("SELECT X'1F', B'0101', U&'d\\0061t', 0xFF, 0b11", Postgres, "SELECT ?, ?, ?, ?, ?"),
            ("SELECT \"Col 1\", t1.c2 FROM s3.t4", Postgres, "SELECT \"Col 1\", t1.c2 FROM s3.t4"),
            (
                "SELECT \"x\", 'a\\'b' FROM `t` WHERE id = ?",
                Mysql,
                "SELECT ?, ? FROM `t` WHERE id = ?",
            ),
            ("SELECT 1 -- secret\n  FROM /* a /* nested */ b */ t", Postgres, "SELECT ? FROM t"),
            ("SELECT 1 # note\nFROM t", Mysql, "SELECT ? FROM t"),
            ("INSERT INTO t VALUES ('unterminated", Postgres, "INSERT INTO t VALUES (?"),
            ("UPDATE t SET v = :v, w = @w", Mysql, "UPDATE t SET v = :v, w = @w"),
        ];
        for (input, dialect, want) in cases {
            assert_eq!(redact(input.as_bytes(), *dialect), *want, "redacting {input:?}");
        }
    }

    #[test]
    fn output_is_capped_on_a_char_boundary() {
        let long = format!("SELECT {}", "é".repeat(MAX_TEXT));
        let out = redact(long.as_bytes(), Postgres);
        assert!(out.len() <= MAX_TEXT && out.len() > MAX_TEXT - 4, "length {}", out.len());
        assert!(out.starts_with("SELECT éé"));
        assert!(capped_text(long.as_bytes()).len() <= MAX_TEXT);
        assert_eq!(capped_text(b"a\xffb"), "a\u{fffd}b");
    }
}
