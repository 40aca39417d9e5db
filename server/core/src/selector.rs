//! Kubernetes-style label selectors: `app=db,env in (prod,staging),!canary,tier!=cache`.
//!
//! Grammar (requirements are ANDed, separated by commas):
//! `key=value`, `key==value`, `key!=value`, `key in (v1,v2)`, `key notin (v1,v2)`,
//! `key` (the label exists), `!key` (it does not). Keys are `[prefix/]name` as in Kubernetes
//! (alphanumerics, `-`, `_`, `.`, starting and ending alphanumeric); values may be empty. An
//! empty selector matches every guest. Parsing is strict: anything else is an error that
//! says where and what was expected.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

/// Longest selector accepted, bytes.
pub const MAX_SELECTOR_LEN: usize = 4096;
const MAX_NAME: usize = 63;
const MAX_PREFIX: usize = 253;

/// Why a selector does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid selector at byte {at}: {message}")]
pub struct SelectorError {
    /// Byte offset of the problem in the input.
    pub at: usize,
    /// What was wrong or expected.
    pub message: String,
}

/// One requirement on one label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    /// `key=value`.
    Equals(String, String),
    /// `key!=value` (also true when the label is absent, as in Kubernetes).
    NotEquals(String, String),
    /// `key in (...)`.
    In(String, BTreeSet<String>),
    /// `key notin (...)` (also true when the label is absent).
    NotIn(String, BTreeSet<String>),
    /// `key`.
    Exists(String),
    /// `!key`.
    DoesNotExist(String),
}

impl Requirement {
    /// Whether `labels` satisfy this requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Self::Equals(k, v) => labels.get(k) == Some(v),
            Self::NotEquals(k, v) => labels.get(k) != Some(v),
            Self::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Self::NotIn(k, vs) => !labels.get(k).is_some_and(|v| vs.contains(v)),
            Self::Exists(k) => labels.contains_key(k),
            Self::DoesNotExist(k) => !labels.contains_key(k),
        }
    }
}

fn set(vs: &BTreeSet<String>) -> String {
    vs.iter().cloned().collect::<Vec<_>>().join(",")
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Equals(k, v) => write!(f, "{k}={v}"),
            Self::NotEquals(k, v) => write!(f, "{k}!={v}"),
            Self::In(k, vs) => write!(f, "{k} in ({})", set(vs)),
            Self::NotIn(k, vs) => write!(f, "{k} notin ({})", set(vs)),
            Self::Exists(k) => write!(f, "{k}"),
            Self::DoesNotExist(k) => write!(f, "!{k}"),
        }
    }
}

/// A parsed label selector: all requirements must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// Parses `input` (see the module documentation).
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        if input.len() > MAX_SELECTOR_LEN {
            return Err(SelectorError {
                at: MAX_SELECTOR_LEN,
                message: format!("longer than {MAX_SELECTOR_LEN} bytes"),
            });
        }
        Parser::new(input).selector()
    }

    /// The selector that matches every guest.
    pub fn everything() -> Self {
        Self::default()
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// The requirements, in input order.
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// True when it matches everything.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Word(String),
    Eq,
    NotEq,
    Bang,
    Open,
    Close,
    Comma,
    End,
}

impl Token {
    fn describe(&self) -> String {
        match self {
            Self::Word(w) => format!("`{w}`"),
            Self::Eq => "`=`".into(),
            Self::NotEq => "`!=`".into(),
            Self::Bang => "`!`".into(),
            Self::Open => "`(`".into(),
            Self::Close => "`)`".into(),
            Self::Comma => "`,`".into(),
            Self::End => "the end of the selector".into(),
        }
    }
}

fn word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')
}

struct Parser<'a> {
    input: &'a str,
    pos: usize,
    peeked: Option<(usize, Token)>,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Self {
            input,
            pos: 0,
            peeked: None,
        }
    }

    fn err<T>(&self, at: usize, message: impl Into<String>) -> Result<T, SelectorError> {
        Err(SelectorError {
            at,
            message: message.into(),
        })
    }

    fn lex(&mut self) -> Result<(usize, Token), SelectorError> {
        let rest = &self.input[self.pos..];
        let skipped = rest.len() - rest.trim_start().len();
        self.pos += skipped;
        let start = self.pos;
        let mut chars = self.input[start..].chars();
        let Some(c) = chars.next() else {
            return Ok((start, Token::End));
        };
        let (len, token) = match c {
            '=' if chars.next() == Some('=') => (2, Token::Eq),
            '=' => (1, Token::Eq),
            '!' if chars.next() == Some('=') => (2, Token::NotEq),
            '!' => (1, Token::Bang),
            '(' => (1, Token::Open),
            ')' => (1, Token::Close),
            ',' => (1, Token::Comma),
            c if word_char(c) => {
                let len = self.input[start..]
                    .find(|c: char| !word_char(c))
                    .unwrap_or(self.input.len() - start);
                (len, Token::Word(self.input[start..start + len].to_string()))
            }
            other => return self.err(start, format!("unexpected character {other:?}")),
        };
        self.pos += len;
        Ok((start, token))
    }

    fn next(&mut self) -> Result<(usize, Token), SelectorError> {
        match self.peeked.take() {
            Some(t) => Ok(t),
            None => self.lex(),
        }
    }

    fn peek(&mut self) -> Result<&Token, SelectorError> {
        if self.peeked.is_none() {
            self.peeked = Some(self.lex()?);
        }
        match &self.peeked {
            Some((_, t)) => Ok(t),
            None => self.err(self.pos, "internal: nothing peeked"),
        }
    }

    fn selector(mut self) -> Result<Selector, SelectorError> {
        let mut requirements = Vec::new();
        if *self.peek()? == Token::End {
            return Ok(Selector { requirements });
        }
        loop {
            requirements.push(self.requirement()?);
            match self.next()? {
                (_, Token::Comma) => {}
                (_, Token::End) => break,
                (at, t) => {
                    return self.err(
                        at,
                        format!(
                            "expected `,` or the end after a requirement, found {}",
                            t.describe()
                        ),
                    );
                }
            }
        }
        Ok(Selector { requirements })
    }

    fn requirement(&mut self) -> Result<Requirement, SelectorError> {
        let (at, first) = self.next()?;
        let key = match first {
            Token::Bang => {
                let (at, t) = self.next()?;
                let Token::Word(key) = t else {
                    return self.err(
                        at,
                        format!("expected a label key after `!`, found {}", t.describe()),
                    );
                };
                check_key(&key, at)?;
                return Ok(Requirement::DoesNotExist(key));
            }
            Token::Word(key) => {
                check_key(&key, at)?;
                key
            }
            t => return self.err(at, format!("expected a label key, found {}", t.describe())),
        };
        match self.peek()?.clone() {
            Token::Comma | Token::End => Ok(Requirement::Exists(key)),
            Token::Eq | Token::NotEq => {
                let (_, op) = self.next()?;
                let value = self.value()?;
                Ok(if op == Token::Eq {
                    Requirement::Equals(key, value)
                } else {
                    Requirement::NotEquals(key, value)
                })
            }
            Token::Word(w) if w == "in" || w == "notin" => {
                self.next()?;
                let values = self.value_set()?;
                Ok(if w == "in" {
                    Requirement::In(key, values)
                } else {
                    Requirement::NotIn(key, values)
                })
            }
            t => {
                let (at, _) = self.next()?;
                self.err(
                    at,
                    format!(
                        "expected `=`, `==`, `!=`, `in`, `notin`, `,` or the end after key `{key}`, found {}",
                        t.describe()
                    ),
                )
            }
        }
    }

    /// A value after `=`/`!=`: a word, or nothing (the empty value) before `,` or the end.
    fn value(&mut self) -> Result<String, SelectorError> {
        match self.peek()?.clone() {
            Token::Comma | Token::End => Ok(String::new()),
            Token::Word(w) => {
                let (at, _) = self.next()?;
                check_value(&w, at)?;
                Ok(w)
            }
            t => {
                let (at, _) = self.next()?;
                self.err(
                    at,
                    format!("expected a label value, found {}", t.describe()),
                )
            }
        }
    }

    fn value_set(&mut self) -> Result<BTreeSet<String>, SelectorError> {
        let (at, t) = self.next()?;
        if t != Token::Open {
            return self.err(
                at,
                format!("expected `(` to open a value list, found {}", t.describe()),
            );
        }
        let mut values = BTreeSet::new();
        loop {
            let (at, t) = self.next()?;
            match t {
                Token::Word(w) => {
                    check_value(&w, at)?;
                    values.insert(w);
                }
                t => {
                    return self.err(
                        at,
                        format!("expected a value in the list, found {}", t.describe()),
                    );
                }
            }
            match self.next()? {
                (_, Token::Comma) => {}
                (_, Token::Close) => break,
                (at, t) => {
                    return self.err(
                        at,
                        format!(
                            "expected `,` or `)` in the value list, found {}",
                            t.describe()
                        ),
                    );
                }
            }
        }
        Ok(values)
    }
}

fn check_name(name: &str, what: &str, at: usize) -> Result<(), SelectorError> {
    let fail = |message: String| Err(SelectorError { at, message });
    if name.is_empty() {
        return fail(format!("{what} is empty"));
    }
    if name.len() > MAX_NAME {
        return fail(format!(
            "{what} `{name}` is longer than {MAX_NAME} characters"
        ));
    }
    if name.contains('/') {
        return fail(format!("{what} `{name}` may not contain `/`"));
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !alnum(name.chars().next()) || !alnum(name.chars().last()) {
        return fail(format!(
            "{what} `{name}` must start and end with a letter or digit"
        ));
    }
    Ok(())
}

fn check_key(key: &str, at: usize) -> Result<(), SelectorError> {
    match key.split_once('/') {
        Some((prefix, name)) => {
            let bad_prefix = prefix.is_empty()
                || prefix.len() > MAX_PREFIX
                || prefix.contains('_')
                || prefix
                    .split('.')
                    .any(|part| check_name(part, "part", at).is_err());
            if bad_prefix {
                return Err(SelectorError {
                    at,
                    message: format!("key prefix `{prefix}` is not a DNS subdomain"),
                });
            }
            check_name(name, "key name", at)
        }
        None => check_name(key, "key", at),
    }
}

fn check_value(value: &str, at: usize) -> Result<(), SelectorError> {
    if value.is_empty() {
        return Ok(());
    }
    check_name(value, "value", at)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_every_operator() {
        let s = Selector::parse(
            "app=db, env in (prod,staging),tier!=cache,!canary,zone, x==1,y notin (a)",
        )
        .unwrap();
        assert_eq!(
            s.requirements(),
            &[
                Requirement::Equals("app".into(), "db".into()),
                Requirement::In("env".into(), ["prod".into(), "staging".into()].into()),
                Requirement::NotEquals("tier".into(), "cache".into()),
                Requirement::DoesNotExist("canary".into()),
                Requirement::Exists("zone".into()),
                Requirement::Equals("x".into(), "1".into()),
                Requirement::NotIn("y".into(), ["a".into()].into()),
            ]
        );
        assert_eq!(
            s.to_string(),
            "app=db,env in (prod,staging),tier!=cache,!canary,zone,x=1,y notin (a)"
        );
        assert_eq!(
            Selector::parse(&s.to_string()).unwrap(),
            s,
            "display round-trips"
        );
    }

    #[test]
    fn matching_follows_kubernetes() {
        let s = Selector::parse("app=db,env in (prod,staging)").unwrap();
        assert!(s.matches(&labels(&[("app", "db"), ("env", "prod")])));
        assert!(!s.matches(&labels(&[("app", "db"), ("env", "dev")])));
        assert!(!s.matches(&labels(&[("app", "db")])));
        let s = Selector::parse("tier!=cache,env notin (dev),!canary").unwrap();
        assert!(
            s.matches(&labels(&[])),
            "absent labels satisfy != and notin"
        );
        assert!(!s.matches(&labels(&[("tier", "cache")])));
        assert!(!s.matches(&labels(&[("env", "dev")])));
        assert!(!s.matches(&labels(&[("canary", "")])));
        let s = Selector::parse("zone").unwrap();
        assert!(s.matches(&labels(&[("zone", "")])));
        assert!(!s.matches(&labels(&[])));
        assert!(Selector::parse("").unwrap().matches(&labels(&[])));
        assert!(Selector::parse("  ").unwrap().is_empty());
        let s = Selector::parse("example.com/team=a,mark=").unwrap();
        assert!(s.matches(&labels(&[("example.com/team", "a"), ("mark", "")])));
    }

    #[test]
    fn errors_say_where_and_what() {
        let cases = [
            ("app=db,", 7, "expected a label key"),
            ("app=db env=x", 7, "expected `,` or the end"),
            ("app in prod", 7, "expected `(`"),
            ("app in (a,", 10, "expected a value"),
            ("app in (a b)", 10, "expected `,` or `)`"),
            ("app in ()", 8, "expected a value"),
            ("app > 3", 4, "unexpected character '>'"),
            ("-app=x", 0, "must start and end"),
            ("app=-x", 4, "must start and end"),
            ("a/b/c=x", 0, "may not contain `/`"),
            ("Ex_ample.com/x=1", 0, "not a DNS subdomain"),
            ("!", 1, "expected a label key after `!`"),
            ("!a=b", 2, "expected `,` or the end"),
            ("app=(x)", 4, "expected a label value"),
            ("app foo", 4, "expected `=`"),
            (",", 0, "expected a label key"),
        ];
        for (input, at, message) in cases {
            let e = Selector::parse(input).unwrap_err();
            assert_eq!(e.at, at, "{input}: {e}");
            assert!(e.message.contains(message), "{input}: {e}");
        }
        let long = format!("a={}", "v".repeat(64));
        assert!(
            Selector::parse(&long)
                .unwrap_err()
                .message
                .contains("longer than 63")
        );
        let huge = "a,".repeat(MAX_SELECTOR_LEN);
        assert!(Selector::parse(&huge).is_err());
    }
}
