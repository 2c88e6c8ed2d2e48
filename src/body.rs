//! The request body: read its top-level members without building a JSON tree, and rewrite
//! only what Tollgate must change. Member values are kept as raw slices of the client's
//! bytes, so a rewrite copies them verbatim and a 5 MiB prompt is never re-serialised.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// The member Tollgate reads attribution from; never forwarded.
pub const METADATA_MEMBER: &str = "_tollgate";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyError {
    #[error("the request body is not valid JSON: {0}")]
    Malformed(String),
    #[error("the request body must be a JSON object")]
    NotAnObject,
    #[error("`{0}` has the wrong type")]
    WrongType(&'static str),
}

/// A parsed request body: its top-level members in order, values as raw JSON text.
#[derive(Debug)]
pub struct RequestBody<'a> {
    members: Vec<(Cow<'a, str>, &'a RawValue)>,
}

/// Changes to make before forwarding. An empty set means the original bytes go as they are.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Edits {
    pub strip_metadata: bool,
    pub model: Option<String>,
    /// Ask an OpenAI stream for its usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// Set a max-output-tokens member (name, value).
    pub max_tokens: Option<(&'static str, u64)>,
}

impl Edits {
    pub fn is_empty(&self) -> bool {
        *self == Edits::default()
    }
}

/// The `_tollgate` object as clients send it.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct BodyMetadata {
    pub customer: Option<String>,
    pub feature: Option<String>,
    pub prompt_key: Option<String>,
    pub version: Option<String>,
    #[serde(alias = "feature_tags")]
    pub tags: Option<Vec<String>>,
}

impl<'a> RequestBody<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<RequestBody<'a>, BodyError> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let members = de
            .deserialize_any(MembersVisitor)
            .map_err(|e| match e.classify() {
                serde_json::error::Category::Data => BodyError::NotAnObject,
                _ => BodyError::Malformed(e.to_string()),
            })?;
        de.end().map_err(|e| BodyError::Malformed(e.to_string()))?;
        Ok(RequestBody { members })
    }

    pub fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.members
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| *v)
    }

    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    fn typed<T: Deserialize<'a>>(&self, name: &'static str) -> Result<Option<T>, BodyError> {
        match self.get(name) {
            None => Ok(None),
            Some(raw) if raw.get() == "null" => Ok(None),
            Some(raw) => serde_json::from_str(raw.get())
                .map(Some)
                .map_err(|_| BodyError::WrongType(name)),
        }
    }

    pub fn model(&self) -> Result<Option<Cow<'a, str>>, BodyError> {
        self.typed::<Cow<'a, str>>("model")
    }

    pub fn stream(&self) -> Result<bool, BodyError> {
        Ok(self.typed::<bool>("stream")?.unwrap_or(false))
    }

    /// OpenAI's end-user field.
    pub fn user(&self) -> Option<String> {
        self.typed::<String>("user").ok().flatten()
    }

    /// Anthropic's end-user field, `metadata.user_id`.
    pub fn metadata_user_id(&self) -> Option<String> {
        #[derive(Deserialize)]
        struct Meta {
            user_id: Option<String>,
        }
        self.typed::<Meta>("metadata").ok().flatten()?.user_id
    }

    pub fn tollgate_metadata(&self) -> Result<Option<BodyMetadata>, BodyError> {
        self.typed::<BodyMetadata>(METADATA_MEMBER)
    }

    /// Whether the client already asked for the usage chunk of an OpenAI stream.
    pub fn include_usage(&self) -> bool {
        #[derive(Deserialize)]
        struct StreamOptions {
            include_usage: Option<bool>,
        }
        self.typed::<StreamOptions>("stream_options")
            .ok()
            .flatten()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }

    /// The first max-output member present, as (name, value).
    pub fn max_output_tokens(&self) -> Option<(&'static str, u64)> {
        ["max_completion_tokens", "max_tokens", "max_output_tokens"]
            .into_iter()
            .find_map(|name| Some((name, self.typed::<u64>(name).ok().flatten()?)))
    }

    /// Builds the upstream body. Members are copied verbatim; only edited members change.
    pub fn rewrite(&self, edits: &Edits) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.raw_len() + 64);
        out.push(b'{');
        let mut first = true;
        let mut push_member = |out: &mut Vec<u8>, key: &str, value: &str| {
            if !std::mem::take(&mut first) {
                out.push(b',');
            }
            write_key(out, key);
            out.extend_from_slice(value.as_bytes());
        };
        let mut model_written = false;
        let mut stream_options_written = false;
        let mut max_written = false;
        for (key, raw) in &self.members {
            match key.as_ref() {
                METADATA_MEMBER if edits.strip_metadata => {}
                "model" if edits.model.is_some() => {
                    let model = json_string(edits.model.as_deref().unwrap_or_default());
                    push_member(&mut out, key, &model);
                    model_written = true;
                }
                "stream_options" if edits.include_usage => {
                    push_member(&mut out, key, &with_include_usage(raw));
                    stream_options_written = true;
                }
                k if edits.max_tokens.is_some_and(|(name, _)| name == k) => {
                    let value = edits.max_tokens.map(|(_, v)| v).unwrap_or_default();
                    push_member(&mut out, key, &value.to_string());
                    max_written = true;
                }
                _ => push_member(&mut out, key, raw.get()),
            }
        }
        if let (Some(model), false) = (&edits.model, model_written) {
            push_member(&mut out, "model", &json_string(model));
        }
        if edits.include_usage && !stream_options_written {
            push_member(&mut out, "stream_options", r#"{"include_usage":true}"#);
        }
        if let (Some((name, value)), false) = (edits.max_tokens, max_written) {
            push_member(&mut out, name, &value.to_string());
        }
        out.push(b'}');
        out
    }

    fn raw_len(&self) -> usize {
        self.members
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum()
    }
}

fn write_key(out: &mut Vec<u8>, key: &str) {
    out.extend_from_slice(json_string(key).as_bytes());
    out.push(b':');
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// `stream_options` with `include_usage: true` set and every other option kept.
fn with_include_usage(raw: &RawValue) -> String {
    match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(raw.get()) {
        Ok(mut options) => {
            options.insert("include_usage".into(), serde_json::Value::Bool(true));
            serde_json::Value::Object(options).to_string()
        }
        Err(_) => r#"{"include_usage":true}"#.to_string(),
    }
}

/// A JSON object key that borrows from the input when it has no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

struct MembersVisitor;

impl<'de> Visitor<'de> for MembersVisitor {
    type Value = Vec<(Cow<'de, str>, &'de RawValue)>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            let value: &'de RawValue = map.next_value()?;
            // A duplicate key keeps JSON's usual last-one-wins meaning.
            members.retain(|(k, _): &(Cow<'de, str>, &'de RawValue)| *k != key);
            members.push((key, value));
        }
        Ok(members)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).expect("valid JSON out")
    }

    #[test]
    fn reads_the_fields_tollgate_needs() {
        let raw = br#"{"model":"gpt-4o","stream":true,"user":"u1","messages":[],
            "_tollgate":{"customer":"acme","feature":"chat","feature_tags":["a","b"]},
            "stream_options":{"include_usage":false},"max_tokens":12}"#;
        let b = RequestBody::parse(raw).expect("parses");
        assert_eq!(b.model().expect("ok").as_deref(), Some("gpt-4o"));
        assert!(b.stream().expect("ok"));
        assert_eq!(b.user().as_deref(), Some("u1"));
        assert!(!b.include_usage());
        assert_eq!(b.max_output_tokens(), Some(("max_tokens", 12)));
        let meta = b.tollgate_metadata().expect("ok").expect("present");
        assert_eq!(meta.customer.as_deref(), Some("acme"));
        assert_eq!(meta.tags, Some(vec!["a".to_string(), "b".to_string()]));
    }

    #[test]
    fn anthropic_user_id() {
        let b = RequestBody::parse(br#"{"metadata":{"user_id":"cust-9"}}"#).expect("parses");
        assert_eq!(b.metadata_user_id().as_deref(), Some("cust-9"));
    }

    #[test]
    fn strip_removes_only_the_metadata_member_and_keeps_values_verbatim() {
        let raw = br#"{"model":"m", "_tollgate":{"customer":"x"}, "messages":[{"content":"h\u00e9 1.50e3"}]}"#;
        let b = RequestBody::parse(raw).expect("parses");
        let out = b.rewrite(&Edits {
            strip_metadata: true,
            ..Edits::default()
        });
        let text = String::from_utf8(out).expect("utf8");
        assert_eq!(
            text,
            r#"{"model":"m","messages":[{"content":"h\u00e9 1.50e3"}]}"#
        );
    }

    #[test]
    fn model_alias_and_include_usage_are_written() {
        let raw = br#"{"model":"alias","stream":true,"stream_options":{"x":1}}"#;
        let b = RequestBody::parse(raw).expect("parses");
        let out = b.rewrite(&Edits {
            model: Some("real-model".into()),
            include_usage: true,
            ..Edits::default()
        });
        let v = value(&out);
        assert_eq!(v["model"], "real-model");
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["x"], 1);
    }

    #[test]
    fn missing_members_are_added() {
        let b = RequestBody::parse(br#"{"stream":true}"#).expect("parses");
        let out = b.rewrite(&Edits {
            include_usage: true,
            max_tokens: Some(("max_tokens", 7)),
            ..Edits::default()
        });
        let v = value(&out);
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["max_tokens"], 7);
    }

    #[test]
    fn bad_bodies_are_refused_with_a_reason() {
        assert!(matches!(
            RequestBody::parse(b"{"),
            Err(BodyError::Malformed(_))
        ));
        assert!(matches!(
            RequestBody::parse(b"[1]"),
            Err(BodyError::NotAnObject)
        ));
        assert!(matches!(
            RequestBody::parse(b"{} x"),
            Err(BodyError::Malformed(_))
        ));
        let b = RequestBody::parse(br#"{"model":5}"#).expect("parses");
        assert_eq!(b.model(), Err(BodyError::WrongType("model")));
        let b = RequestBody::parse(br#"{"_tollgate":"x"}"#).expect("parses");
        assert_eq!(
            b.tollgate_metadata(),
            Err(BodyError::WrongType("_tollgate"))
        );
    }

    #[test]
    fn escaped_keys_survive_a_rewrite() {
        let b = RequestBody::parse(br#"{"a\"b":1,"_tollgate":{}}"#).expect("parses");
        let out = b.rewrite(&Edits {
            strip_metadata: true,
            ..Edits::default()
        });
        assert_eq!(value(&out), serde_json::json!({"a\"b": 1}));
    }
}
