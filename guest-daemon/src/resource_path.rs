//! `repository/type/tag`: the address of a KBS resource, checked so that it
//! can go into a URL path and a file name without escaping or traversal.

use std::fmt;
use std::str::FromStr;

/// Longest segment accepted, in bytes (a common file-name limit).
pub const MAX_SEGMENT_LEN: usize = 255;

/// A validated resource address `repository/type/tag`.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct ResourcePath {
    /// `repo/type/tag`; kept as one string so errors that carry a path stay small.
    full: Box<str>,
    /// Byte offsets of the two slashes.
    slashes: [u16; 2],
}

/// Why a string is not a valid resource path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourcePathError {
    /// The path does not have exactly three `/`-separated segments.
    #[error("resource path must be repository/type/tag (3 segments), got {0}")]
    SegmentCount(usize),
    /// A segment is empty.
    #[error("resource path: {0} is empty")]
    Empty(&'static str),
    /// A segment is longer than [`MAX_SEGMENT_LEN`].
    #[error("resource path: {segment} is {len} bytes, at most {MAX_SEGMENT_LEN} allowed")]
    TooLong {
        /// Which segment.
        segment: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// A segment holds a character outside `[A-Za-z0-9._-]`.
    #[error("resource path: {segment} contains {ch:?}; only A-Z a-z 0-9 . _ - are allowed")]
    BadChar {
        /// Which segment.
        segment: &'static str,
        /// The first offending character.
        ch: char,
    },
    /// A segment is `.` or `..`.
    #[error("resource path: {0} may not be \".\" or \"..\"")]
    DotSegment(&'static str),
}

const SEGMENT_NAMES: [&str; 3] = ["repository", "type", "tag"];

fn check_segment(segment: &'static str, value: &str) -> Result<(), ResourcePathError> {
    if value.is_empty() {
        return Err(ResourcePathError::Empty(segment));
    }
    if value.len() > MAX_SEGMENT_LEN {
        return Err(ResourcePathError::TooLong {
            segment,
            len: value.len(),
        });
    }
    if let Some(ch) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(ResourcePathError::BadChar { segment, ch });
    }
    if value == "." || value == ".." {
        return Err(ResourcePathError::DotSegment(segment));
    }
    Ok(())
}

impl ResourcePath {
    /// Build from the three segments, validating each.
    pub fn new(
        repo: impl Into<String>,
        kind: impl Into<String>,
        tag: impl Into<String>,
    ) -> Result<Self, ResourcePathError> {
        let (repo, kind, tag) = (repo.into(), kind.into(), tag.into());
        check_segment(SEGMENT_NAMES[0], &repo)?;
        check_segment(SEGMENT_NAMES[1], &kind)?;
        check_segment(SEGMENT_NAMES[2], &tag)?;
        // Segments are at most 255 bytes, so the offsets fit in u16.
        let first = repo.len() as u16;
        let second = first + 1 + kind.len() as u16;
        Ok(Self {
            full: format!("{repo}/{kind}/{tag}").into_boxed_str(),
            slashes: [first, second],
        })
    }

    /// The repository segment.
    pub fn repo(&self) -> &str {
        &self.full[..usize::from(self.slashes[0])]
    }

    /// The type segment.
    pub fn kind(&self) -> &str {
        &self.full[usize::from(self.slashes[0]) + 1..usize::from(self.slashes[1])]
    }

    /// The tag segment.
    pub fn tag(&self) -> &str {
        &self.full[usize::from(self.slashes[1]) + 1..]
    }

    /// The whole path, `repo/type/tag`.
    pub fn as_str(&self) -> &str {
        &self.full
    }
}

impl FromStr for ResourcePath {
    type Err = ResourcePathError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let segments: Vec<&str> = s.split('/').collect();
        let [repo, kind, tag] = segments.as_slice() else {
            return Err(ResourcePathError::SegmentCount(segments.len()));
        };
        Self::new(*repo, *kind, *tag)
    }
}

impl TryFrom<String> for ResourcePath {
    type Error = ResourcePathError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ResourcePath> for String {
    fn from(p: ResourcePath) -> String {
        p.to_string()
    }
}

impl fmt::Display for ResourcePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ResourcePath, ResourcePathError> {
        s.parse()
    }

    #[test]
    fn parses_and_displays() {
        let p = parse("default/key/1").unwrap();
        assert_eq!((p.repo(), p.kind(), p.tag()), ("default", "key", "1"));
        assert_eq!(p.to_string(), "default/key/1");
        let p = parse("my-repo/tls_cert/v1.2.3").unwrap();
        assert_eq!(
            (p.repo(), p.kind(), p.tag()),
            ("my-repo", "tls_cert", "v1.2.3")
        );
        assert_eq!(p.to_string(), "my-repo/tls_cert/v1.2.3");
        assert_eq!(
            p,
            ResourcePath::new("my-repo", "tls_cert", "v1.2.3").unwrap()
        );
        assert_eq!(parse(&p.to_string()).unwrap(), p);
    }

    #[test]
    fn rejects_traversal() {
        assert_eq!(
            parse("../key/1"),
            Err(ResourcePathError::DotSegment("repository"))
        );
        assert_eq!(
            parse("default/./1"),
            Err(ResourcePathError::DotSegment("type"))
        );
        assert_eq!(
            parse("default/key/.."),
            Err(ResourcePathError::DotSegment("tag"))
        );
        assert_eq!(
            parse("default/../../etc/passwd"),
            Err(ResourcePathError::SegmentCount(5))
        );
        assert!(parse("/etc/passwd").is_err());
        // Dots inside a name are fine.
        assert!(parse("a..b/...x/.hidden").is_ok());
    }

    #[test]
    fn rejects_encoded_and_odd_characters() {
        for bad in [
            "default%2Fkey/x/1",
            "default/key%2F..%2F/1",
            "default/key/%2e%2e",
            "default\\key/x/1",
            "default/key/1?x=y",
            "default/key/1#frag",
            "default/ke y/1",
            "default/key/1\n",
            "default/kéy/1",
            "default/key/\u{0}",
        ] {
            assert!(
                matches!(parse(bad), Err(ResourcePathError::BadChar { .. })),
                "{bad:?} -> {:?}",
                parse(bad)
            );
        }
    }

    #[test]
    fn rejects_empty_segments_and_wrong_counts() {
        assert_eq!(parse(""), Err(ResourcePathError::SegmentCount(1)));
        assert_eq!(parse("a/b"), Err(ResourcePathError::SegmentCount(2)));
        assert_eq!(parse("a/b/c/d"), Err(ResourcePathError::SegmentCount(4)));
        assert_eq!(parse("a//c"), Err(ResourcePathError::Empty("type")));
        assert_eq!(parse("/b/c"), Err(ResourcePathError::Empty("repository")));
        assert_eq!(parse("a/b/"), Err(ResourcePathError::Empty("tag")));
        assert_eq!(parse("a/b/c/"), Err(ResourcePathError::SegmentCount(4)));
    }

    #[test]
    fn length_limit_is_bytes() {
        let ok = "a".repeat(MAX_SEGMENT_LEN);
        let p = parse(&format!("{ok}/{ok}/{ok}")).unwrap();
        assert_eq!((p.repo(), p.kind(), p.tag()), (&*ok, &*ok, &*ok));
        let long = "a".repeat(MAX_SEGMENT_LEN + 1);
        assert_eq!(
            parse(&format!("r/{long}/c")),
            Err(ResourcePathError::TooLong {
                segment: "type",
                len: 256
            })
        );
    }

    #[test]
    fn serde_validates() {
        let p: ResourcePath = serde_json::from_str(r#""default/key/1""#).unwrap();
        assert_eq!(serde_json::to_string(&p).unwrap(), r#""default/key/1""#);
        assert!(serde_json::from_str::<ResourcePath>(r#""default/../1""#).is_err());
    }

    #[test]
    fn error_messages_name_the_segment() {
        let msg = parse("a/b%2F/c").unwrap_err().to_string();
        assert!(msg.contains("type") && msg.contains("'%'"), "{msg}");
    }
}
