//! Resource paths `<repository>/<type>/<tag>`, validated so no segment can escape its place.

use std::fmt;
use std::str::FromStr;

/// A validated resource path.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourcePath {
    /// Repository (first segment).
    pub repo: String,
    /// Type (second segment).
    pub kind: String,
    /// Tag (third segment).
    pub tag: String,
}

/// Longest segment accepted, bytes.
pub const MAX_SEGMENT: usize = 255;

/// Check one path segment: `[A-Za-z0-9._-]{1,255}`, not `.` or `..`.
pub fn check_segment(which: &str, s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("{which} is empty"));
    }
    if s.len() > MAX_SEGMENT {
        return Err(format!("{which} is longer than {MAX_SEGMENT} bytes"));
    }
    if s == "." || s == ".." {
        return Err(format!("{which} `{s}` is a relative path component"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{which} contains {c:?}: only letters, digits, '.', '_' and '-' are allowed"
        ));
    }
    Ok(())
}

impl ResourcePath {
    /// Build from three (already percent-decoded) segments.
    pub fn new(repo: &str, kind: &str, tag: &str) -> Result<Self, String> {
        check_segment("repository", repo)?;
        check_segment("type", kind)?;
        check_segment("tag", tag)?;
        Ok(Self {
            repo: repo.to_string(),
            kind: kind.to_string(),
            tag: tag.to_string(),
        })
    }

    /// The segments as upstream policies see them (`data["resource-path"]`).
    pub fn segments(&self) -> [&str; 3] {
        [&self.repo, &self.kind, &self.tag]
    }
}

impl FromStr for ResourcePath {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [repo, kind, tag] => Self::new(repo, kind, tag),
            _ => Err(format!(
                "resource path `{}` must have exactly three segments: <repository>/<type>/<tag>",
                s.escape_debug()
            )),
        }
    }
}

impl fmt::Display for ResourcePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.repo, self.kind, self.tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays() {
        let p: ResourcePath = "default/key/one".parse().unwrap();
        assert_eq!(p.to_string(), "default/key/one");
        assert_eq!(p.segments(), ["default", "key", "one"]);
    }

    #[test]
    fn refuses_traversal_and_odd_characters() {
        for bad in [
            "../key/one",
            "default/../one",
            "default/key/..",
            "default/key/.",
            "default/key",
            "default/key/one/two",
            "default//one",
            "default/k%2Fy/one",
            "default/k\\y/one",
            "default/key/o ne",
            "default/key/\u{e9}",
        ] {
            assert!(bad.parse::<ResourcePath>().is_err(), "{bad} accepted");
        }
        assert!(ResourcePath::new("a/b", "c", "d").is_err());
        assert!(ResourcePath::new(&"a".repeat(256), "c", "d").is_err());
    }
}
