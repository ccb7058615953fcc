//! Domain names as policy rules and DNS pins hold them: validated, lower-case ASCII,
//! without the trailing dot.

use serde::{Deserialize, Serialize};

/// Longest name in presentation form without the trailing dot (RFC 1035: 255 octets
/// on the wire, i.e. 253 characters).
pub const MAX_NAME_LEN: usize = 253;
/// Longest label.
pub const MAX_LABEL_LEN: usize = 63;

/// A validated domain name: 1..=253 characters, labels of 1..=63 characters from
/// `a-z 0-9 - _`, stored lower-case without a trailing dot. Non-ASCII names must be
/// written in their punycode (`xn--`) form, which is what travels in DNS, so a look-alike
/// Unicode name can never equal an ASCII one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DomainName(String);

/// Why a string is not a domain name (never contains the string itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainError {
    Empty,
    TooLong,
    EmptyLabel,
    LabelTooLong,
    BadCharacter,
    NotAscii,
    AllNumeric,
}

impl std::fmt::Display for DomainError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DomainError::Empty => "is empty",
            DomainError::TooLong => "is longer than 253 characters",
            DomainError::EmptyLabel => "has an empty label (two dots in a row, or a leading dot)",
            DomainError::LabelTooLong => "has a label longer than 63 characters",
            DomainError::BadCharacter => "contains a character other than a-z, 0-9, '-', '_' and '.'",
            DomainError::NotAscii => "is not ASCII (write internationalised names in their xn-- punycode form)",
            DomainError::AllNumeric => "looks like an IP address, not a domain name",
        })
    }
}

impl DomainName {
    /// Validates and normalises `s` (case folded, one trailing dot removed).
    pub fn new(s: &str) -> Result<DomainName, DomainError> {
        let s = s.strip_suffix('.').unwrap_or(s);
        if s.is_empty() {
            return Err(DomainError::Empty);
        }
        if !s.is_ascii() {
            return Err(DomainError::NotAscii);
        }
        if s.len() > MAX_NAME_LEN {
            return Err(DomainError::TooLong);
        }
        for label in s.split('.') {
            if label.is_empty() {
                return Err(DomainError::EmptyLabel);
            }
            if label.len() > MAX_LABEL_LEN {
                return Err(DomainError::LabelTooLong);
            }
            if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return Err(DomainError::BadCharacter);
            }
        }
        // "1.2.3" or "10.0.0.300" is a mistyped address, not a name: a real top-level
        // domain is never all digits.
        if s.rsplit('.').next().is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit())) {
            return Err(DomainError::AllNumeric);
        }
        Ok(DomainName(s.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when `self` is `suffix` or a subdomain of it, on label boundaries:
    /// `a.example.com` and `example.com` are under `example.com`;
    /// `evil-example.com` and `example.com.evil.com` are not.
    pub fn is_under(&self, suffix: &DomainName) -> bool {
        let (n, s) = (self.0.as_str(), suffix.0.as_str());
        n == s || (n.len() > s.len() && n.ends_with(s) && n.as_bytes()[n.len() - s.len() - 1] == b'.')
    }
}

/// Lets maps keyed by `DomainName` be searched with a `&str` (the derived `Hash` of the
/// newtype is the `String`'s, which equals the `str`'s).
impl std::borrow::Borrow<str> for DomainName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for DomainName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for DomainName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        DomainName::new(&s).map_err(|e| format!("domain name {e}"))
    }
}

impl From<DomainName> for String {
    fn from(d: DomainName) -> String {
        d.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_case_and_trailing_dot() {
        assert_eq!(DomainName::new("LOCALHOST.").unwrap().as_str(), "localhost");
        assert_eq!(DomainName::new("Api.Example.COM").unwrap().as_str(), "api.example.com");
        assert_eq!(DomainName::new("_dmarc.xn--bcher-kva.example").unwrap().as_str(), "_dmarc.xn--bcher-kva.example");
    }

    #[test]
    fn rejects_malformed_names() {
        use DomainError::*;
        let long_label = "a".repeat(64);
        let long_name = vec!["abcdefghi"; 26].join("."); // 259 chars
        let cases: &[(&str, DomainError)] = &[
            ("", Empty),
            (".", Empty),
            ("a..b", EmptyLabel),
            (".example.com", EmptyLabel),
            ("example.com..", EmptyLabel),
            (&long_label, LabelTooLong),
            (&long_name, TooLong),
            ("exa mple.com", BadCharacter),
            ("exa\0mple.com", BadCharacter),
            ("exa\\.mple.com", BadCharacter),
            ("exa/mple.com", BadCharacter),
            ("bücher.example", NotAscii),
            ("1.2.3", AllNumeric),
            ("10.0.0.300", AllNumeric),
        ];
        for (s, want) in cases {
            assert_eq!(DomainName::new(s), Err(*want), "{s:?}");
        }
        assert!(DomainName::new(&"a".repeat(63)).is_ok());
        let max = format!("{}.{}.{}.{}", "a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61));
        assert_eq!(max.len(), 253);
        assert!(DomainName::new(&max).is_ok());
    }

    #[test]
    fn suffix_matching_is_on_label_boundaries() {
        let s = DomainName::new("example.com").unwrap();
        let under = |n: &str| DomainName::new(n).unwrap().is_under(&s);
        assert!(under("example.com"));
        assert!(under("a.example.com"));
        assert!(under("A.B.EXAMPLE.COM."));
        assert!(!under("evil-example.com"));
        assert!(!under("example.com.evil.com"));
        assert!(!under("xexample.com"));
        assert!(!under("com"));
    }
}
