//! Guest paths and file names as bytes.
//!
//! Linux names are byte strings: `"a\xFF"` is a valid file name that no JSON string can
//! hold. [`PathBytes`] carries them exactly. On the wire it is a JSON string when the bytes
//! are UTF-8 (the common case stays readable and unchanged) and `{"b64": "<base64>"}`
//! otherwise; both forms are accepted when reading.

use std::fmt;

use base64::Engine as _;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

/// A path or file name, exactly as the filesystem has it.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PathBytes(pub Vec<u8>);

impl PathBytes {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The bytes for messages: UTF-8 as is, control characters and bytes that are not
    /// UTF-8 escaped (`\n`, `\xFF`), so a message shows exactly which name it means.
    pub fn escaped(&self) -> String {
        escape(&self.0)
    }
}

/// See [`PathBytes::escaped`].
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() || c == '\\' {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02X}"));
        }
    }
    out
}

impl fmt::Debug for PathBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.escaped())
    }
}

impl fmt::Display for PathBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.escaped())
    }
}

impl From<&str> for PathBytes {
    fn from(s: &str) -> Self {
        PathBytes(s.as_bytes().to_vec())
    }
}

impl From<String> for PathBytes {
    fn from(s: String) -> Self {
        PathBytes(s.into_bytes())
    }
}

impl From<Vec<u8>> for PathBytes {
    fn from(b: Vec<u8>) -> Self {
        PathBytes(b)
    }
}

impl From<&[u8]> for PathBytes {
    fn from(b: &[u8]) -> Self {
        PathBytes(b.to_vec())
    }
}

fn b64_encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn b64_decode(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

impl Serialize for PathBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => s.serialize_str(text),
            Err(_) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("b64", &b64_encode(&self.0))?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for PathBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PathBytes;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a path: a string or {\"b64\": base64}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PathBytes, E> {
                Ok(PathBytes::from(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PathBytes, A::Error> {
                let mut bytes = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != "b64" || bytes.is_some() {
                        return Err(de::Error::custom("a path object has exactly one key, \"b64\""));
                    }
                    let text: String = map.next_value()?;
                    bytes = Some(b64_decode(&text).ok_or_else(|| de::Error::custom("invalid base64 in a path"))?);
                }
                bytes.map(PathBytes).ok_or_else(|| de::Error::custom("a path object needs \"b64\""))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_stays_a_string_and_other_bytes_round_trip() {
        let p = PathBytes::from("/tmp/café");
        assert_eq!(serde_json::to_string(&p).unwrap(), "\"/tmp/café\"");
        for bytes in [&b"/a\xFF"[..], b"\xFE\xFF\n x", b"", b"\x80", b"ab\xC3", b"abcd\xE2\x82"] {
            let p = PathBytes(bytes.to_vec());
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(serde_json::from_str::<PathBytes>(&json).unwrap(), p, "{json}");
        }
        assert_eq!(serde_json::to_string(&PathBytes(b"/a\xFF".to_vec())).unwrap(), r#"{"b64":"L2H/"}"#);
        assert!(serde_json::from_str::<PathBytes>(r#"{"b64":"L2H"}"#).is_err());
        assert!(serde_json::from_str::<PathBytes>(r#"{"x":"L2H/"}"#).is_err());
        assert!(serde_json::from_str::<PathBytes>(r#"{"b64":"=AAA"}"#).is_err());
        assert!(serde_json::from_str::<PathBytes>("7").is_err());
    }

    #[test]
    fn escaped_for_messages() {
        assert_eq!(PathBytes(b"/d/a\xFF\nb\\ c\xC3\xA9".to_vec()).escaped(), "/d/a\\xFF\\nb\\\\ cé");
    }
}
