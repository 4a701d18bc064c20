//! Bounds of numeric params, read from the JSON schema schemars derives for a
//! kind's `Params`: `#[schemars(range(min = A, max = B))]` on a field, plus
//! `extend("exclusiveMinimum" = A)` (or `exclusiveMaximum`) where the bound
//! itself is not allowed. [`crate::params`] checks them for every kind before
//! deserializing, so a kind's `check` has no ranges of single fields to check.
//!
//! TOML has `nan` and `inf` but JSON has neither: they reach the params as
//! `null`, and TOML has no null of its own, so a `null` where the schema
//! wants a number is one of them.

use serde_json::Value;

use crate::ParamError;

/// Checks every number in `params` against the bounds of its place in
/// `schema`; the error names the first one out of bounds, and its range.
pub fn check(schema: &Value, params: &Value) -> Result<(), ParamError> {
    let defs = schema.get("$defs").unwrap_or(&Value::Null);
    Walk { defs, path: Vec::new() }.check(schema, params)
}

/// The bounds of a number's schema in words ("between 1 and 1048576", "in
/// (0, 86400]", "at least 0"); `None` if it has none.
fn range(schema: &Value) -> Option<String> {
    let bound = |key| schema.get(key).filter(|b| b.is_number());
    let low = bound("exclusiveMinimum").map(|b| ('(', b)).or(bound("minimum").map(|b| ('[', b)));
    let high = bound("exclusiveMaximum").map(|b| (')', b)).or(bound("maximum").map(|b| (']', b)));
    Some(match (low, high) {
        (Some(('[', a)), Some((']', b))) => format!("between {a} and {b}"),
        (Some((open, a)), Some((close, b))) => format!("in {open}{a}, {b}{close}"),
        (Some(('[', a)), None) => format!("at least {a}"),
        (Some((_, a)), None) => format!("above {a}"),
        (None, Some((']', b))) => format!("at most {b}"),
        (None, Some((_, b))) => format!("below {b}"),
        (None, None) => return None,
    })
}

struct Walk<'a> {
    defs: &'a Value,
    path: Vec<String>,
}

impl<'a> Walk<'a> {
    fn check(&mut self, schema: &Value, value: &Value) -> Result<(), ParamError> {
        // A `$ref` and `allOf` parts apply alongside the schema's own keywords.
        for part in self.target(schema).into_iter().chain(parts(schema, "allOf")) {
            self.check(part, value)?;
        }
        // An optional or an enum: the variant the value is.
        if let Some(variant) = parts(schema, "anyOf").chain(parts(schema, "oneOf")).find(|v| self.fits(v, value)) {
            self.check(variant, value)?;
        }
        match value {
            Value::Number(n) => {
                let x = n.as_f64().expect("a JSON number is an f64");
                let bound = |key| schema.get(key).and_then(Value::as_f64);
                let inside = bound("minimum").is_none_or(|b| x >= b)
                    && bound("exclusiveMinimum").is_none_or(|b| x > b)
                    && bound("maximum").is_none_or(|b| x <= b)
                    && bound("exclusiveMaximum").is_none_or(|b| x < b);
                if inside {
                    Ok(())
                } else {
                    Err(self.error(schema, &n.to_string()))
                }
            }
            Value::Null if only_numbers(schema) => Err(self.error(schema, "nan or inf")),
            Value::Object(fields) => {
                let Some(properties) = schema.get("properties") else { return Ok(()) };
                for (key, field) in fields {
                    if let Some(field_schema) = properties.get(key) {
                        self.path.push(key.clone());
                        self.check(field_schema, field)?;
                        self.path.pop();
                    }
                }
                Ok(())
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    // A tuple's elements each have their own schema.
                    let element = schema.get("prefixItems").and_then(|p| p.get(i)).or_else(|| schema.get("items"));
                    if let Some(element) = element {
                        self.path.push(i.to_string());
                        self.check(element, item)?;
                        self.path.pop();
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The definition a `$ref` points to.
    fn target(&self, schema: &Value) -> Option<&'a Value> {
        let name = schema.get("$ref")?.as_str()?.strip_prefix("#/$defs/")?;
        self.defs.get(name)
    }

    /// Whether `value` can be `variant` (of an `anyOf` or `oneOf`): its type
    /// and the tags that tell an enum's variants apart (`const`, `enum`, the
    /// `required` keys, a property's `const`).
    fn fits(&self, variant: &Value, value: &Value) -> bool {
        let tag_fits = |schema: &Value, value: &Value| {
            schema.get("const").is_none_or(|c| c == value) && schema.get("enum").and_then(Value::as_array).is_none_or(|e| e.contains(value))
        };
        let required = variant.get("required").and_then(Value::as_array);
        let properties = variant.get("properties").and_then(Value::as_object);
        type_fits(variant, value)
            && tag_fits(variant, value)
            && required.is_none_or(|keys| keys.iter().filter_map(Value::as_str).all(|key| value.get(key).is_some()))
            && properties.is_none_or(|p| p.iter().all(|(key, field)| value.get(key).is_none_or(|v| tag_fits(field, v))))
            && self.target(variant).into_iter().chain(parts(variant, "allOf")).all(|part| self.fits(part, value))
    }

    fn error(&self, schema: &Value, got: &str) -> ParamError {
        // `tasks[3].timeout_s`: the params have no maps with numbers for keys.
        let mut field = String::new();
        for segment in &self.path {
            match segment.parse::<usize>() {
                Ok(index) => field += &format!("[{index}]"),
                Err(_) if field.is_empty() => field += segment,
                Err(_) => field += &format!(".{segment}"),
            }
        }
        let allowed = range(schema).unwrap_or_else(|| "a finite number".into());
        ParamError { path: self.path.clone(), message: format!("`{field}` must be {allowed}, not {got}") }
    }
}

/// The subschemas of an `allOf`, `anyOf` or `oneOf`.
fn parts<'s>(schema: &'s Value, key: &str) -> impl Iterator<Item = &'s Value> {
    schema.get(key).and_then(Value::as_array).into_iter().flatten()
}

/// The JSON types a schema's `type` names; `None` (any type) if it has none.
fn types(schema: &Value) -> Option<Vec<&str>> {
    match schema.get("type")? {
        Value::String(one) => Some(vec![one.as_str()]),
        Value::Array(many) => Some(many.iter().filter_map(Value::as_str).collect()),
        _ => None,
    }
}

fn type_fits(schema: &Value, value: &Value) -> bool {
    let Some(types) = types(schema) else { return true };
    let name = match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) if types.contains(&"integer") => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    types.contains(&name)
}

/// A schema that admits numbers and nothing else (in particular, no null).
fn only_numbers(schema: &Value) -> bool {
    types(schema).is_some_and(|t| !t.is_empty() && t.iter().all(|t| *t == "number" || *t == "integer"))
}

#[cfg(test)]
mod tests {
    use schemars::JsonSchema;
    use serde::Serialize;

    use super::*;

    #[derive(Clone, Serialize, JsonSchema)]
    struct Params {
        #[schemars(range(min = 1, max = 1024))]
        steps: u64,
        inner: Inner,
        #[schemars(range(min = 1, max = 100))]
        top_k: Option<usize>,
        tasks: Vec<Task>,
        choice: Choice,
        #[schemars(inner(range(min = 0, max = 1)))]
        fractions: Vec<f64>,
        pair: (u8, f64),
    }

    #[derive(Clone, Serialize, JsonSchema)]
    struct Inner {
        #[schemars(range(max = 10), extend("exclusiveMinimum" = 0))]
        lr: f64,
        #[schemars(range(min = 0), extend("exclusiveMaximum" = 1))]
        beta: f64,
    }

    #[derive(Clone, Serialize, JsonSchema)]
    struct Task {
        name: String,
        #[serde(flatten)]
        kind: Kind,
    }

    #[derive(Clone, Serialize, JsonSchema)]
    #[serde(tag = "type", rename_all = "snake_case")]
    enum Kind {
        Text(Text),
        Code(Code),
    }

    #[derive(Clone, Serialize, JsonSchema)]
    struct Text {
        #[schemars(range(max = 5))]
        limit: usize,
    }

    #[derive(Clone, Serialize, JsonSchema)]
    struct Code {
        #[schemars(range(max = 86_400), extend("exclusiveMinimum" = 0))]
        timeout_s: f64,
    }

    #[derive(Clone, Serialize, JsonSchema)]
    #[serde(rename_all = "snake_case")]
    enum Choice {
        All,
        Last(#[schemars(range(max = 8))] usize),
        Nested(Inner),
    }

    const INNER: Inner = Inner { lr: 0.1, beta: 0.9 };

    fn good() -> Params {
        Params {
            steps: 10,
            inner: INNER,
            top_k: None,
            tasks: vec![
                Task { name: "a".into(), kind: Kind::Text(Text { limit: 5 }) },
                Task { name: "b".into(), kind: Kind::Code(Code { timeout_s: 10.0 }) },
            ],
            choice: Choice::All,
            fractions: vec![0.5, 1.0],
            pair: (3, 0.5),
        }
    }

    fn checked(params: &Params) -> Result<(), ParamError> {
        check(&schemars::schema_for!(Params).to_value(), &serde_json::to_value(params).unwrap())
    }

    fn error(params: &Params) -> (Vec<String>, String) {
        let e = checked(params).unwrap_err();
        (e.path, e.message)
    }

    #[test]
    fn values_inside_the_bounds_pass() {
        checked(&good()).unwrap();
        checked(&Params { steps: 1024, top_k: Some(1), choice: Choice::Last(8), ..good() }).unwrap();
        checked(&Params { steps: 1, top_k: Some(100), choice: Choice::Nested(INNER), ..good() }).unwrap();
    }

    #[test]
    fn both_bounds_of_a_field_are_checked() {
        let (path, message) = error(&Params { steps: 1_000_000_000_000, ..good() });
        assert_eq!(path, ["steps"]);
        assert_eq!(message, "`steps` must be between 1 and 1024, not 1000000000000");
        assert_eq!(error(&Params { steps: 0, ..good() }).1, "`steps` must be between 1 and 1024, not 0");
    }

    #[test]
    fn exclusive_bounds_leave_out_the_bound_itself() {
        let (path, message) = error(&Params { inner: Inner { lr: 0.0, ..INNER }, ..good() });
        assert_eq!(path, ["inner", "lr"]);
        assert_eq!(message, "`inner.lr` must be in (0, 10], not 0.0");
        assert_eq!(error(&Params { inner: Inner { beta: 1.0, ..INNER }, ..good() }).1, "`inner.beta` must be in [0, 1), not 1.0");
        checked(&Params { inner: Inner { lr: 10.0, beta: 0.0 }, ..good() }).unwrap();
    }

    #[test]
    fn optionals_are_checked_when_set() {
        assert_eq!(error(&Params { top_k: Some(0), ..good() }), (vec!["top_k".into()], "`top_k` must be between 1 and 100, not 0".into()));
        assert_eq!(error(&Params { top_k: Some(101), ..good() }).0, ["top_k"]);
    }

    #[test]
    fn array_items_and_tagged_tasks_are_checked() {
        let mut p = good();
        p.tasks[1].kind = Kind::Code(Code { timeout_s: 1e300 });
        let (path, message) = error(&p);
        assert_eq!(path, ["tasks", "1", "timeout_s"]);
        assert_eq!(message, "`tasks[1].timeout_s` must be in (0, 86400], not 1e+300");
        // Each task is checked against its own type's bounds.
        p.tasks[1].kind = Kind::Text(Text { limit: 6 });
        assert_eq!(error(&p).0, ["tasks", "1", "limit"]);
        assert_eq!(error(&Params { fractions: vec![0.5, 1.5], ..good() }).0, ["fractions", "1"]);
    }

    #[test]
    fn the_variant_of_an_enum_is_checked() {
        assert_eq!(error(&Params { choice: Choice::Last(9), ..good() }).0, ["choice", "last"]);
        let nested = Choice::Nested(Inner { lr: 11.0, ..INNER });
        assert_eq!(error(&Params { choice: nested, ..good() }).0, ["choice", "nested", "lr"]);
    }

    #[test]
    fn non_finite_floats_arrive_as_null_and_are_rejected() {
        let (path, message) = error(&Params { inner: Inner { lr: f64::NAN, ..INNER }, ..good() });
        assert_eq!(path, ["inner", "lr"]);
        assert_eq!(message, "`inner.lr` must be in (0, 10], not nan or inf");
        // In a tuple, whose elements have a schema each, and without bounds.
        assert_eq!(error(&Params { pair: (3, f64::INFINITY), ..good() }).1, "`pair[1]` must be a finite number, not nan or inf");
    }
}
