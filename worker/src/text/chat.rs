//! Rendering a conversation with a checkpoint's Jinja chat template.
//!
//! The model was trained on whatever Python `transformers`' `apply_chat_template` produced,
//! so that is the reference, byte for byte. `transformers` renders with Jinja2's
//! `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` plus the
//! `loopcontrols` extension, a JSON-style `tojson` filter, and the globals
//! `raise_exception` and `strftime_now`; the context holds `messages`, `tools` (None),
//! `documents` (None), `add_generation_prompt` and the tokenizer's special token strings
//! (`bos_token`, `eos_token`, `unk_token`, `pad_token`, each only when set). We rebuild
//! that environment on minijinja:
//!
//! - whitespace: `trim_blocks` and `lstrip_blocks` on, the template's single trailing
//!   newline dropped (Jinja2's default `keep_trailing_newline=False`);
//! - Python string/dict methods (`.strip()`, `.startswith()`, `.items()`, ...) through
//!   `minijinja_contrib::pycompat`;
//! - `tojson` as `transformers` overrides it: `json.dumps(x, ensure_ascii=False)` with
//!   Python's `", "`/`": "` separators and no HTML escaping (minijinja's own filter is
//!   compact and escapes `<`, `>`, `&`, `'`);
//! - `{{ none }}` prints `None` and booleans print `True`/`False`, as Python does;
//! - `{% generation %}`/`{% endgeneration %}` (transformers' assistant-mask extension)
//!   render their body unchanged;
//! - messages keep their key order (`role`, `content`) when iterated or serialised.
//!
//! Known differences left: `strftime_now` formats UTC (Python uses the local zone, which
//! is UTC in our containers); map literals written inside a template iterate in sorted key
//! order; `loop.previtem`/`loop.nextitem` need minijinja's `adjacent_loop_items` feature,
//! which is not enabled.
//!
//! Token ids for a chat are `encode(rendered, add_special_tokens = false)`: the template
//! writes BOS and the role markers itself, and `apply_chat_template(tokenize=True)` tokenizes
//! with `add_special_tokens=False` for exactly that reason (a second BOS otherwise). The
//! fixture generator asserts this against `transformers` (including a checkpoint whose
//! post-processor adds BOS and whose template writes it), and `text::fixtures` checks our
//! ids against its output.

use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Enumerator, Kwargs, Object, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, State, UndefinedBehavior, Value};
use serde::{Deserialize, Serialize};

use super::TextError;

/// The name the template is stored under inside its environment; minijinja error
/// messages cite it with a line number.
const TEMPLATE_NAME: &str = "chat_template";

/// Instructions one render may run. A released template over thousands of messages runs
/// well under a million; a checkpoint's template that loops for ever (nested `range`s)
/// ends here, in well under a second, with an error naming it.
pub const TEMPLATE_FUEL: u64 = 20_000_000;

/// Bytes one rendered prompt may have: far beyond any context a model takes, and a bound
/// on a template that writes without end (each `'x' * n` may be 100 MB in minijinja).
pub const MAX_RENDERED_BYTES: usize = 32 << 20;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Special token strings a template may print (`{{ bos_token }}`); from
/// `tokenizer_config.json`. Unset ones are undefined in the template, as in `transformers`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TemplateTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    origin: String,
    tokens: TemplateTokens,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`. `origin` says where it came from (a file path, usually) and is
    /// quoted in every error.
    pub fn new(
        source: &str,
        origin: impl Into<String>,
        tokens: TemplateTokens,
    ) -> Result<ChatTemplate, TextError> {
        let origin = origin.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_fuel(Some(TEMPLATE_FUEL));
        // Chat templates produce plain text; an origin name ending in `.html` must not
        // switch on HTML escaping.
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_formatter);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, strip_generation_tags(source))
            .map_err(|e| TextError::TemplateSyntax {
                origin: origin.clone(),
                message: e.to_string(),
            })?;
        Ok(ChatTemplate {
            env,
            origin,
            tokens,
        })
    }

    /// Where the template came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The prompt text for `messages`, with the assistant header appended when
    /// `add_generation_prompt`. A template's `raise_exception` becomes
    /// [`TextError::TemplateRaised`] carrying its message.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TextError> {
        self.render_with(messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// [`render`](Self::render) with extra template variables, like `transformers`'
    /// `apply_chat_template(**kwargs)` (e.g. Qwen 3's `enable_thinking`). Extra variables
    /// override the standard ones of the same name.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, TextError> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_object(MessageObject {
                    role: Value::from(m.role.as_str()),
                    content: Value::from(m.content.as_str()),
                })
            })
            .collect();
        let mut context: Vec<(String, Value)> = vec![
            ("messages".into(), Value::from(messages)),
            ("tools".into(), Value::from(())),
            ("documents".into(), Value::from(())),
            (
                "add_generation_prompt".into(),
                Value::from(add_generation_prompt),
            ),
        ];
        let tokens = [
            ("bos_token", &self.tokens.bos_token),
            ("eos_token", &self.tokens.eos_token),
            ("unk_token", &self.tokens.unk_token),
            ("pad_token", &self.tokens.pad_token),
        ];
        for (name, token) in tokens {
            if let Some(token) = token {
                context.push((name.into(), Value::from(token.as_str())));
            }
        }
        for (name, value) in extra {
            context.retain(|(n, _)| n != name);
            context.push((name.clone(), Value::from_serialize(value)));
        }
        let context = Value::from_iter(context);

        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| self.render_error(&e))?;
        let mut out = Capped::default();
        template
            .render_captured_to(context, &mut out)
            .map_err(|e| self.render_error(&e))?;
        String::from_utf8(out.bytes).map_err(|e| TextError::TemplateRender {
            origin: self.origin.clone(),
            message: format!("the rendered prompt is not UTF-8: {e}"),
        })
    }

    fn render_error(&self, error: &Error) -> TextError {
        match error.kind() {
            ErrorKind::OutOfFuel => {
                return TextError::TemplateRender {
                    origin: self.origin.clone(),
                    message: format!(
                        "the template ran more than {TEMPLATE_FUEL} instructions (a loop \
                         that does not end?)"
                    ),
                };
            }
            ErrorKind::WriteFailure => {
                return TextError::TemplateRender {
                    origin: self.origin.clone(),
                    message: format!(
                        "the rendered prompt exceeds {} MiB",
                        MAX_RENDERED_BYTES >> 20
                    ),
                };
            }
            _ => {}
        }
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(e) = cause {
            if let Some(raised) = e.downcast_ref::<Raised>() {
                return TextError::TemplateRaised {
                    origin: self.origin.clone(),
                    message: raised.0.clone(),
                };
            }
            cause = e.source();
        }
        TextError::TemplateRender {
            origin: self.origin.clone(),
            message: error.to_string(),
        }
    }
}

/// The render's output, refused past [`MAX_RENDERED_BYTES`].
#[derive(Default)]
struct Capped {
    bytes: Vec<u8>,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_RENDERED_BYTES {
            return Err(std::io::Error::other("the rendered prompt is too large"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A message as the template sees it: a map whose keys iterate as `role`, `content`
/// (the order a Python dict built by a client has), so `message|tojson` and
/// `message.items()` match Python.
#[derive(Debug)]
struct MessageObject {
    role: Value,
    content: Value,
}

impl Object for MessageObject {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(self.role.clone()),
            "content" => Some(self.content.clone()),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

/// The payload of an error raised by the template's `raise_exception`, found again in
/// the error chain so the message reaches the client untouched.
#[derive(Debug)]
struct Raised(String);

impl fmt::Display for Raised {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

fn raise_exception(message: Value) -> Result<Value, Error> {
    let message = match message.as_str() {
        Some(s) => s.to_string(),
        None => message.to_string(),
    };
    Err(Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(Raised(message)))
}

fn strftime_now(format: String) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&format, now)
}

/// Prints values as Python's `str()` would where minijinja differs: `None`, `True`, `False`.
fn python_formatter(
    out: &mut minijinja::Output<'_>,
    state: &State<'_, '_>,
    value: &Value,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.write_str("None").map_err(Error::from),
        ValueKind::Bool => out
            .write_str(if value.is_true() { "True" } else { "False" })
            .map_err(Error::from),
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// Replaces transformers' `{% generation %}` / `{% endgeneration %}` tags, which only mark
/// assistant spans for training masks, by an always-true `if` block. Being a block tag
/// too, it gets the same `trim_blocks`/`lstrip_blocks` treatment, so the output does not
/// change by a byte.
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        match parse_generation_tag(tag) {
            Some((len, open_ws, end, close_ws)) => {
                let body = if end { "endif" } else { "if true" };
                out.push_str(&format!("{{%{open_ws} {body} {close_ws}%}}"));
                rest = &tag[len..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Parses `{%[-+]? (end)?generation [-+]?%}` at the start of `tag`: (length, opening
/// whitespace control, is end tag, closing whitespace control).
fn parse_generation_tag(tag: &str) -> Option<(usize, &str, bool, &str)> {
    let inner = tag.strip_prefix("{%")?;
    let (open_ws, inner) = match inner.chars().next()? {
        c @ ('-' | '+') => (&tag[2..2 + c.len_utf8()], &inner[1..]),
        _ => ("", inner),
    };
    let trimmed = inner.trim_start();
    let (end, after) = if let Some(r) = trimmed.strip_prefix("endgeneration") {
        (true, r)
    } else if let Some(r) = trimmed.strip_prefix("generation") {
        (false, r)
    } else {
        return None;
    };
    let after_ws = after.trim_start();
    // `generation_x` or similar is another tag entirely.
    if after_ws.len() == after.len() && !after.starts_with(['-', '+', '%']) {
        return None;
    }
    let (close_ws, after) = match after_ws.chars().next()? {
        c @ ('-' | '+') => (if c == '-' { "-" } else { "+" }, &after_ws[1..]),
        _ => ("", after_ws),
    };
    let after = after.strip_prefix("%}")?;
    Some((tag.len() - after.len(), open_ws, end, close_ws))
}

/// `tojson` as `transformers` defines it:
/// `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(
    value: &Value,
    ensure_ascii: Option<Value>,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> Result<Value, Error> {
    let ensure_ascii = match ensure_ascii {
        Some(v) => v.is_true(),
        None => kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => Some(" ".repeat(i64::try_from(v)?.max(0) as usize)),
        },
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Value>>("separators")? {
        Some(seps) if !seps.is_none() => {
            let item = seps.get_item_by_index(0)?;
            let key = seps.get_item_by_index(1)?;
            match (item.as_str(), key.as_str()) {
                (Some(i), Some(k)) => (i.to_string(), k.to_string()),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    ));
                }
            }
        }
        // Python's defaults: no space after ',' at line ends when indenting.
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let writer = PyJson {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    writer.write(&mut out, value, 0)?;
    Ok(Value::from(out))
}

/// Python's `json.dumps` output format.
struct PyJson {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl PyJson {
    fn newline(&self, out: &mut String, level: usize) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    }

    fn write(&self, out: &mut String, value: &Value, level: usize) -> Result<(), Error> {
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => out.push_str(&python_number(value)),
            ValueKind::String => self.write_str(out, value.as_str().unwrap_or_default()),
            ValueKind::Bytes => {
                let bytes = value.as_bytes().unwrap_or_default();
                self.write_str(out, &String::from_utf8_lossy(bytes));
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.write_container(out, '[', ']', level, &items, |out, item, level| {
                    self.write(out, item, level)
                })?;
            }
            ValueKind::Map => {
                let mut entries = Vec::new();
                for key in value.try_iter()? {
                    let item = value.get_item(&key)?;
                    let key = match key.as_str() {
                        Some(s) => s.to_string(),
                        None if key.is_number() => python_number(&key),
                        None if key.kind() == ValueKind::Bool => {
                            (if key.is_true() { "true" } else { "false" }).to_string()
                        }
                        None if key.is_none() => "null".to_string(),
                        None => key.to_string(),
                    };
                    entries.push((key, item));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.write_container(out, '{', '}', level, &entries, |out, (k, v), level| {
                    self.write_str(out, k);
                    out.push_str(&self.key_sep);
                    self.write(out, v, level)
                })?;
            }
            // Python would refuse to serialise these; their string form is the most useful.
            _ => self.write_str(out, &value.to_string()),
        }
        Ok(())
    }

    fn write_container<T>(
        &self,
        out: &mut String,
        open: char,
        close: char,
        level: usize,
        items: &[T],
        mut write_item: impl FnMut(&mut String, &T, usize) -> Result<(), Error>,
    ) -> Result<(), Error> {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return Ok(());
        }
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            self.newline(out, level + 1);
            write_item(out, item, level + 1)?;
        }
        self.newline(out, level);
        out.push(close);
        Ok(())
    }

    fn write_str(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{08}' => out.push_str("\\b"),
                '\u{0c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c if self.ensure_ascii && !c.is_ascii() => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A number as Python's `repr` (and so `json.dumps`) writes it: integers plainly, floats
/// with the shortest round-trip digits, a `.0` on integral values, and exponent notation
/// outside [1e-4, 1e16).
fn python_number(value: &Value) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    let Ok(x) = f64::try_from(value.clone()) else {
        return value.to_string();
    };
    python_float(x)
}

fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let sci = format!("{x:e}");
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if (-4..16).contains(&exponent) {
        let fixed = format!("{x}");
        if fixed.contains('.') {
            fixed
        } else {
            format!("{fixed}.0")
        }
    } else {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exponent.abs())
    }
}

const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// Civil (proleptic Gregorian) date from days since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Python's `strftime` for a UTC instant, covering the directives chat templates use
/// (`%d %b %Y` and friends, with glibc's `-` no-padding flag). Unknown directives are
/// copied through, as glibc does.
fn strftime(format: &str, unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUMULATIVE: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUMULATIVE[(month - 1) as usize] + day + u32::from(leap && month > 2);
    let hour12 = match hour % 12 {
        0 => 12,
        h => h,
    };

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.peek() == Some(&'-');
        if unpadded {
            chars.next();
        }
        let num = |out: &mut String, n: i64, width: usize| {
            if unpadded {
                let _ = write!(out, "{n}");
            } else {
                let _ = write!(out, "{n:0width$}");
            }
        };
        match chars.next() {
            Some('a') => out.push_str(&WEEKDAYS[weekday][..3]),
            Some('A') => out.push_str(WEEKDAYS[weekday]),
            Some('b') | Some('h') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('d') => num(&mut out, i64::from(day), 2),
            Some('e') => {
                let _ = write!(out, "{day:>2}");
            }
            Some('H') => num(&mut out, hour, 2),
            Some('I') => num(&mut out, hour12, 2),
            Some('j') => num(&mut out, i64::from(yday), 3),
            Some('m') => num(&mut out, i64::from(month), 2),
            Some('M') => num(&mut out, minute, 2),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('S') => num(&mut out, second, 2),
            Some('w') => num(&mut out, weekday as i64, 1),
            Some('y') => num(&mut out, year.rem_euclid(100), 2),
            Some('Y') => {
                let _ = write!(out, "{year}");
            }
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(source: &str) -> ChatTemplate {
        let tokens = TemplateTokens {
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
            ..TemplateTokens::default()
        };
        match ChatTemplate::new(source, "test", tokens) {
            Ok(t) => t,
            Err(e) => panic!("template does not compile: {e}"),
        }
    }

    fn render(t: &ChatTemplate, messages: &[ChatMessage], generation_prompt: bool) -> String {
        match t.render(messages, generation_prompt) {
            Ok(s) => s,
            Err(e) => panic!("render failed: {e}"),
        }
    }

    fn chat() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("system", "You are helpful."),
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello!"),
            ChatMessage::new("user", "Bye"),
        ]
    }

    /// The ChatML template of Qwen2, as written in its tokenizer_config.json.
    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_with_and_without_generation_prompt() {
        let t = template(CHATML);
        let expected = "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n";
        assert_eq!(render(&t, &chat(), false), expected);
        assert_eq!(
            render(&t, &chat(), true),
            format!("{expected}<|im_start|>assistant\n")
        );
        // Default system prompt when none is given.
        assert_eq!(
            render(&t, &[ChatMessage::new("user", "x")], true),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    /// Llama 3's template: `set` with `+`, `| trim`, `loop.index0`, `bos_token`.
    const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    #[test]
    fn llama3_style() {
        let t = template(LLAMA3);
        let messages = [
            ChatMessage::new("system", "  Be brief.\n"),
            ChatMessage::new("user", "Hi"),
        ];
        assert_eq!(
            render(&t, &messages, true),
            "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn trim_blocks_lstrip_blocks_and_trailing_newline() {
        // Multi-line template as chat_template.jinja files are written: block tags on
        // their own indented lines leave no whitespace behind, and the final newline of
        // the file is dropped.
        let source = "{% for message in messages %}\n    {% if message.role == 'user' %}\nU: {{ message.content }}\n    {% else %}\nA: {{ message.content }}\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\nA:\n{% endif %}\n";
        let t = template(source);
        let messages = [
            ChatMessage::new("user", "a"),
            ChatMessage::new("assistant", "b"),
        ];
        assert_eq!(render(&t, &messages, true), "U: a\nA: b\nA:\n");
        assert_eq!(render(&t, &messages, false), "U: a\nA: b\n");
    }

    #[test]
    fn raise_exception_message_reaches_the_caller() {
        let source = "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{{ message['content'] }}{% endfor %}";
        let t = template(source);
        let ok = [
            ChatMessage::new("user", "a"),
            ChatMessage::new("assistant", "b"),
        ];
        assert_eq!(render(&t, &ok, false), "ab");
        let bad = [ChatMessage::new("user", "a"), ChatMessage::new("user", "b")];
        match t.render(&bad, false) {
            Err(TextError::TemplateRaised { message, origin }) => {
                assert_eq!(
                    message,
                    "Conversation roles must alternate user/assistant/user/assistant/..."
                );
                assert_eq!(origin, "test");
            }
            other => panic!("expected TemplateRaised, got {other:?}"),
        }
    }

    #[test]
    fn python_string_methods() {
        let source = "{% for m in messages %}[{{ m.content.strip() }}|{{ m.content.startswith(' x') }}|{{ m.content.lstrip().upper() }}|{{ m.content.split('y')[0] }}]{% endfor %}";
        let t = template(source);
        assert_eq!(
            render(&t, &[ChatMessage::new("user", " xyz ")], false),
            "[xyz|True|XYZ | x]"
        );
    }

    #[test]
    fn loop_last_and_namespace() {
        let source = "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{{ m.content }}{% if not loop.last %}, {% else %}.{% endif %}{% endfor %} ({{ ns.n }})";
        let t = template(source);
        let messages = [
            ChatMessage::new("user", "a"),
            ChatMessage::new("assistant", "b"),
            ChatMessage::new("user", "c"),
        ];
        assert_eq!(render(&t, &messages, false), "a, b, c. (3)");
    }

    #[test]
    fn special_tokens_tools_and_none() {
        let t = template(
            "{{ bos_token }}|{{ eos_token }}|{{ tools is none }}|{{ unk_token is defined }}|{{ none }}|{{ messages[0].missing is defined }}",
        );
        assert_eq!(
            render(&t, &[ChatMessage::new("user", "a")], false),
            "<s>|</s>|True|False|None|False"
        );
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = template(
            "{{ messages[0] | tojson }}|{{ {'a': [1, 2.5, none, true]} | tojson }}|{{ messages[0].content | tojson(indent=2) }}|{{ [1, {'k': 'v'}] | tojson(indent=2) }}|{{ 'é' | tojson(ensure_ascii=true) }}|{{ {'b': 1, 'a': 2} | tojson(sort_keys=true, separators=(',', ':')) }}",
        );
        let out = render(&t, &[ChatMessage::new("user", "<\"é\">\n")], false);
        assert_eq!(
            out,
            "{\"role\": \"user\", \"content\": \"<\\\"é\\\">\\n\"}|{\"a\": [1, 2.5, null, true]}|\"<\\\"é\\\">\\n\"|[\n  1,\n  {\n    \"k\": \"v\"\n  }\n]|\"\\u00e9\"|{\"a\":2,\"b\":1}"
        );
    }

    #[test]
    fn python_float_repr() {
        assert_eq!(python_float(1.0), "1.0");
        assert_eq!(python_float(0.1), "0.1");
        assert_eq!(python_float(1e16), "1e+16");
        assert_eq!(python_float(1.5e-5), "1.5e-05");
        assert_eq!(python_float(123456.75), "123456.75");
        assert_eq!(python_float(-2.0), "-2.0");
    }

    #[test]
    fn generation_tags_render_their_body() {
        let source = "{% for m in messages %}{% if m.role == 'assistant' %}\n{% generation %}\n{{ m.content }}\n{%- endgeneration %}\n{% else %}{{ m.content }}{% endif %}{% endfor %}";
        let t = template(source);
        let messages = [
            ChatMessage::new("user", "q "),
            ChatMessage::new("assistant", "a"),
        ];
        assert_eq!(render(&t, &messages, false), "q a");
        assert_eq!(
            strip_generation_tags("{%- generation -%}x{%endgeneration%}{% generation_x %}"),
            "{%- if true -%}x{% endif %}{% generation_x %}"
        );
    }

    #[test]
    fn strftime_formats() {
        // 2024-07-23 15:04:05 UTC, a Tuesday, day 205 of a leap year.
        let t = 1_721_747_045;
        assert_eq!(strftime("%d %b %Y", t), "23 Jul 2024");
        assert_eq!(
            strftime("%A %B %-d %H:%M:%S %I%p %j %y %%", t),
            "Tuesday July 23 15:04:05 03PM 205 24 %"
        );
        assert_eq!(strftime("%d %b %Y", 0), "01 Jan 1970");
        assert_eq!(strftime("%Y-%m-%d", 951_782_400), "2000-02-29");
        let t = template("{{ strftime_now('%Y') | length }}");
        assert_eq!(render(&t, &[], false), "4");
    }

    #[test]
    fn syntax_errors_name_the_origin() {
        match ChatTemplate::new(
            "{% for m in messages %}",
            "dir/tokenizer_config.json",
            TemplateTokens::default(),
        ) {
            Err(e @ TextError::TemplateSyntax { .. }) => {
                let text = e.to_string();
                assert!(text.contains("dir/tokenizer_config.json"), "{text}");
            }
            other => panic!("expected a syntax error, got {other:?}"),
        }
    }

    #[test]
    fn extra_variables() {
        let t = template(
            "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>{% endif %}x",
        );
        let mut extra = serde_json::Map::new();
        assert_eq!(t.render_with(&[], false, &extra).ok().as_deref(), Some("x"));
        extra.insert("enable_thinking".into(), serde_json::Value::Bool(false));
        assert_eq!(
            t.render_with(&[], false, &extra).ok().as_deref(),
            Some("<think>\n\n</think>x")
        );
    }

    #[test]
    fn a_template_that_would_run_for_ever_runs_out_of_fuel() {
        // 10^10 iterations without the bound.
        let t = template(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        );
        let started = std::time::Instant::now();
        match t.render(&chat(), true) {
            Err(e @ TextError::TemplateRender { .. }) => {
                let text = e.to_string();
                assert!(text.contains("test"), "{text}");
                assert!(text.contains("20000000 instructions"), "{text}");
            }
            other => panic!("expected an error, got {other:?}"),
        }
        // Not a timing claim: a loose bound so a missing fuel limit fails, not hangs.
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
    }

    #[test]
    fn a_template_that_writes_without_end_stops_at_the_cap() {
        // 100 MB a line, a million times: 10^14 bytes without the cap.
        let t = template("{% for i in range(100000) %}{{ 'x' * 100000000 }}{% endfor %}");
        match t.render(&chat(), true) {
            Err(e @ TextError::TemplateRender { .. }) => {
                let text = e.to_string();
                assert!(text.contains("exceeds 32 MiB"), "{text}");
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 500, ..Default::default() })]

        /// Any conversation (any roles, any content, Jinja syntax included) through the
        /// ChatML template and a template that raises on roles it does not know: the
        /// prompt with every content verbatim (content is data, never template), the
        /// template's own refusal, or an error naming the template; never a panic.
        #[test]
        fn any_conversation_renders_with_its_content_verbatim_or_is_refused(
            messages in proptest::collection::vec(
                ("(system|user|assistant|tool|[a-z{}%]{0,6})", ".{0,40}"),
                0..8,
            ),
            generation_prompt in proptest::bool::ANY,
        ) {
            let messages: Vec<ChatMessage> =
                messages.into_iter().map(|(r, c)| ChatMessage::new(r, c)).collect();
            let strict = template(
                "{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}\
                 {{ raise_exception('unknown role ' + m.role) }}{% endif %}\
                 [{{ m.role }}]{{ m.content }}{% endfor %}",
            );
            for t in [template(CHATML), strict] {
                match t.render(&messages, generation_prompt) {
                    Ok(prompt) => {
                        for m in &messages {
                            proptest::prop_assert!(prompt.contains(&m.content), "{prompt:?}");
                        }
                    }
                    // The template's own refusal is shown as it wrote it.
                    Err(TextError::TemplateRaised { message, .. }) => {
                        proptest::prop_assert!(message.starts_with("unknown role"), "{message}")
                    }
                    Err(e) => proptest::prop_assert!(e.to_string().contains("test"), "{e}"),
                }
            }
        }
    }
}
