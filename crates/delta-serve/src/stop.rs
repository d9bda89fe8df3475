//! `stop` strings: generation ends where the text first contains one of them, and the text ends
//! just before it. While streaming, the tail that could still grow into a stop string is held
//! back, so a client never sees part of one.

use serde_json::Value;

use crate::error::ServeError;

/// OpenAI's limit on stop strings per request.
pub const MAX_STOPS: usize = 4;

/// The `stop` field: null, a string, or an array of up to four non-empty strings.
pub fn parse(v: Option<&Value>) -> Result<Vec<String>, ServeError> {
    let bad = |m: &str| ServeError::BadRequest(format!("`stop` {m}"));
    let stops: Vec<String> = match v {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad("must hold strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("must be a string or an array of strings")),
    };
    if stops.len() > MAX_STOPS {
        return Err(bad(&format!(
            "holds {} strings, at most {MAX_STOPS} are allowed",
            stops.len()
        )));
    }
    if stops.iter().any(String::is_empty) {
        return Err(bad("strings must not be empty"));
    }
    Ok(stops)
}

/// Scans generated text for stop strings as it comes.
pub struct StopScan {
    stops: Vec<String>,
    /// Text received but not yet released.
    pending: String,
    stopped: bool,
}

impl StopScan {
    pub fn new(stops: Vec<String>) -> Self {
        StopScan {
            stops,
            pending: String::new(),
            stopped: false,
        }
    }

    /// Whether a stop string has been seen (nothing after it is released).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Takes the next piece of text; returns what can be released now.
    pub fn push(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.pending.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return out;
        }
        // Hold back the longest tail that is the start of some stop string.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .rev()
                    .filter(|&n| s.is_char_boundary(n))
                    .map(move |n| &s[..n])
            })
            .filter(|prefix| self.pending.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let release = self.pending.len() - keep;
        let out = self.pending[..release].to_string();
        self.pending.drain(..release);
        out
    }

    /// At the end of generation: whatever was held back.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let mut scan = StopScan::new(stops.iter().map(|s| s.to_string()).collect());
        let out: Vec<String> = pieces.iter().map(|p| scan.push(p)).collect();
        let stopped = scan.stopped();
        (out, stopped, scan.finish())
    }

    #[test]
    fn text_ends_before_the_first_stop_string_and_partial_matches_are_held_back() {
        // "\n\n" split over two pieces: the first newline is held, then dropped with the stop.
        let (out, stopped, rest) = run(&["\n\n"], &["Once", " upon\n", "\nthe end"]);
        assert_eq!(out, ["Once", " upon", ""]);
        assert!(stopped);
        assert_eq!(rest, "");
        // A held tail that does not become a stop string is released later.
        let (out, stopped, rest) = run(&["END"], &["a E", "N", "d b", "EN"]);
        assert_eq!(out, ["a ", "", "ENd b", ""]);
        assert!(!stopped);
        assert_eq!(rest, "EN");
        // The earliest of several stop strings wins; text after it never comes out.
        let (out, stopped, _) = run(&["c", "b"], &["abcd", "more"]);
        assert_eq!(out, ["a", ""]);
        assert!(stopped);
        // Multi-byte characters: prefixes are cut on character boundaries only.
        let (out, _, rest) = run(&["é!"], &["caf", "é"]);
        assert_eq!(out, ["caf", ""]);
        assert_eq!(rest, "é");
    }

    #[test]
    fn the_field_is_checked() {
        assert_eq!(parse(None).unwrap(), Vec::<String>::new());
        assert_eq!(parse(Some(&Value::Null)).unwrap(), Vec::<String>::new());
        assert_eq!(parse(Some(&serde_json::json!("x"))).unwrap(), ["x"]);
        assert_eq!(
            parse(Some(&serde_json::json!(["a", "b"]))).unwrap(),
            ["a", "b"]
        );
        assert!(parse(Some(&serde_json::json!(["a", ""]))).is_err());
        assert!(parse(Some(&serde_json::json!([1]))).is_err());
        assert!(parse(Some(&serde_json::json!(["a", "b", "c", "d", "e"]))).is_err());
        assert!(parse(Some(&serde_json::json!({"a": 1}))).is_err());
    }
}
