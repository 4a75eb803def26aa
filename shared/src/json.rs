//! Small JSON helpers that the event decoders (`s3_event`, `ingest`) share.

use serde_json::Value;

/// The string at `path` (object fields, outermost first), if every step exists.
pub(crate) fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(value, |v, field| v.get(field))
        .and_then(Value::as_str)
}

/// What a value is, for a message that says what was found instead.
pub(crate) fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strings_by_path_and_kinds_by_name() {
        let v = json!({"s3": {"bucket": {"name": "b"}, "size": 3}});
        assert_eq!(str_at(&v, &["s3", "bucket", "name"]), Some("b"));
        assert_eq!(str_at(&v, &["s3", "size"]), None, "not a string");
        assert_eq!(str_at(&v, &["s3", "object", "key"]), None, "no such field");
        assert_eq!(kind_of(&v), "an object");
        assert_eq!(kind_of(&json!([1])), "an array");
        assert_eq!(kind_of(&json!(null)), "null");
    }
}
