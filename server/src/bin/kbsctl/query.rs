//! Query strings for the admin API's listings.

/// Percent-encodes a query value; `*` (the audit filter's prefix wildcard, legal in a query)
/// is left as is.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'*' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_and_prefixes_are_encoded_for_a_query() {
        assert_eq!(urlencode("resource.*"), "resource.*");
        assert_eq!(
            urlencode("app=db,zone in (eu-1)"),
            "app%3Ddb%2Czone%20in%20%28eu-1%29"
        );
        assert_eq!(urlencode("a/b&c"), "a%2Fb%26c");
    }
}
