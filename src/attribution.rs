//! Who a call is charged to. Sources, highest first: `x-tollgate-*` headers, the body's
//! `_tollgate` object, then the provider's own end-user field (`user` for OpenAI,
//! `metadata.user_id` for Anthropic) for the customer.

use crate::body::BodyMetadata;

/// Longest attribution value accepted; longer ones are refused rather than truncated,
/// so two tenants can never collapse into one.
pub const MAX_VALUE_LEN: usize = 256;
const MAX_TAGS: usize = 32;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attribution {
    pub customer: Option<String>,
    pub feature: Option<String>,
    pub team: Option<String>,
    pub key_id: Option<String>,
    pub prompt_key: Option<String>,
    pub prompt_version: Option<String>,
    pub tags: Vec<String>,
}

impl Attribution {
    /// The budget scopes this call is charged to (`global` first).
    pub fn scopes(&self) -> Vec<String> {
        let mut scopes = vec!["global".to_string()];
        let named = [
            ("team", &self.team),
            ("key", &self.key_id),
            ("customer", &self.customer),
            ("feature", &self.feature),
        ];
        for (kind, value) in named {
            if let Some(v) = value {
                scopes.push(format!("{kind}:{v}"));
            }
        }
        scopes
    }
}

/// The `x-tollgate-*` attribution headers of one request, as sent.
#[derive(Debug, Default, Clone)]
pub struct HeaderMetadata {
    pub customer: Option<String>,
    pub feature: Option<String>,
    pub prompt_key: Option<String>,
    pub prompt_version: Option<String>,
    /// Comma-separated.
    pub tags: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AttributionError {
    #[error(
        "{field}: value is empty, longer than {MAX_VALUE_LEN} bytes or has control characters"
    )]
    BadValue { field: &'static str },
    #[error("{field}: more than {MAX_TAGS} tags")]
    TooManyTags { field: &'static str },
}

fn checked(field: &'static str, v: Option<String>) -> Result<Option<String>, AttributionError> {
    let Some(s) = v else { return Ok(None) };
    let t = s.trim();
    if t.is_empty() || t.len() > MAX_VALUE_LEN || t.chars().any(char::is_control) {
        return Err(AttributionError::BadValue { field });
    }
    // Copied only when trimming changed it.
    Ok(Some(if t.len() == s.len() { s } else { t.to_string() }))
}

fn checked_tags(field: &'static str, tags: Vec<String>) -> Result<Vec<String>, AttributionError> {
    if tags.len() > MAX_TAGS {
        return Err(AttributionError::TooManyTags { field });
    }
    tags.into_iter()
        .filter(|t| !t.trim().is_empty())
        .map(|t| checked(field, Some(t)).map(Option::unwrap_or_default))
        .collect()
}

/// Resolves attribution. `provider_user` is the provider's own end-user field, if any.
pub fn resolve(
    headers: HeaderMetadata,
    body: Option<BodyMetadata>,
    provider_user: Option<String>,
    key_id: &str,
    team: &str,
) -> Result<Attribution, AttributionError> {
    let body = body.unwrap_or_default();
    let header_tags = headers
        .tags
        .map(|t| t.split(',').map(str::to_string).collect::<Vec<_>>());
    let tags = match header_tags {
        Some(t) => checked_tags("x-tollgate-tags", t)?,
        None => checked_tags("_tollgate.tags", body.tags.unwrap_or_default())?,
    };
    let customer = match checked("x-tollgate-customer", headers.customer)? {
        Some(c) => Some(c),
        None => match checked("_tollgate.customer", body.customer)? {
            Some(c) => Some(c),
            // The provider's own field is the client's business; a bad one just isn't used.
            None => checked("user", provider_user).ok().flatten(),
        },
    };
    Ok(Attribution {
        customer,
        feature: first(
            checked("x-tollgate-feature", headers.feature)?,
            checked("_tollgate.feature", body.feature)?,
        ),
        team: Some(team.to_string()),
        key_id: Some(key_id.to_string()),
        prompt_key: first(
            checked("x-tollgate-prompt-key", headers.prompt_key)?,
            checked("_tollgate.prompt_key", body.prompt_key)?,
        ),
        prompt_version: first(
            checked("x-tollgate-prompt-version", headers.prompt_version)?,
            checked("_tollgate.version", body.version)?,
        ),
        tags,
    })
}

fn first(a: Option<String>, b: Option<String>) -> Option<String> {
    a.or(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(customer: &str, feature: &str) -> BodyMetadata {
        BodyMetadata {
            customer: Some(customer.into()),
            feature: Some(feature.into()),
            tags: Some(vec!["b1".into()]),
            ..BodyMetadata::default()
        }
    }

    #[test]
    fn headers_beat_body_beat_provider_field() {
        let headers = HeaderMetadata {
            customer: Some("h-cust".into()),
            tags: Some("x, y".into()),
            ..HeaderMetadata::default()
        };
        let a = resolve(
            headers,
            Some(body("b-cust", "b-feat")),
            Some("u".into()),
            "k",
            "t",
        )
        .expect("valid");
        assert_eq!(a.customer.as_deref(), Some("h-cust"));
        assert_eq!(a.feature.as_deref(), Some("b-feat"));
        assert_eq!(a.tags, vec!["x", "y"]);
        assert_eq!(
            (a.key_id.as_deref(), a.team.as_deref()),
            (Some("k"), Some("t"))
        );

        let a = resolve(HeaderMetadata::default(), None, Some("u".into()), "k", "t").expect("ok");
        assert_eq!(a.customer.as_deref(), Some("u"));
        let a = resolve(
            HeaderMetadata::default(),
            Some(body("b", "f")),
            Some("u".into()),
            "k",
            "t",
        )
        .expect("ok");
        assert_eq!(a.customer.as_deref(), Some("b"));
        assert_eq!(a.tags, vec!["b1"]);
    }

    #[test]
    fn oversized_or_control_values_are_refused() {
        let headers = HeaderMetadata {
            feature: Some("x".repeat(MAX_VALUE_LEN + 1)),
            ..HeaderMetadata::default()
        };
        assert_eq!(
            resolve(headers, None, None, "k", "t"),
            Err(AttributionError::BadValue {
                field: "x-tollgate-feature"
            })
        );
        let headers = HeaderMetadata {
            customer: Some("a\u{7}b".into()),
            ..HeaderMetadata::default()
        };
        assert!(resolve(headers, None, None, "k", "t").is_err());
    }
}
