//! Stop strings over streamed text.
//!
//! A client's stop strings (OpenAI `stop`) end generation when they appear in the output;
//! neither they nor anything after them is returned. Text arrives in deltas, so a stop
//! string may span several of them: [`StopMatcher`] emits text as soon as it can no
//! longer become part of a stop string, and holds back the longest tail that is still a
//! prefix of one.
//!
//! When several stop strings match, the one that completes first in the text wins (the
//! point where character-by-character generation would have stopped); between two that
//! complete at the same place, the longer one, so none of it leaks out. With stops
//! `["ab", "b"]` and text `"xab"` that is `"ab"`, giving `"x"`.
//!
//! Empty stop strings are ignored (they would match before any text).

/// What [`StopMatcher::push`] decided about a delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// No stop string yet; `text` may be sent now (possibly empty while a tail is held).
    Continue(String),
    /// The stop string `stop` matched; `text` is what remains to send before it.
    /// Generation should end here.
    Stopped { text: String, stop: String },
}

/// Per-sequence stop string state.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    /// The non-empty stop strings.
    stops: Vec<String>,
    /// Text received but not yet emitted: a tail that may be the start of a stop string.
    held: String,
    stopped: bool,
}

impl StopMatcher {
    pub fn new(stop: &[String]) -> StopMatcher {
        StopMatcher {
            stops: stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Whether there is anything to match (callers may skip the matcher otherwise).
    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Whether a stop string has matched; later deltas are ignored.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Feeds the next text delta.
    pub fn push(&mut self, delta: &str) -> StopOutcome {
        if self.stopped {
            return StopOutcome::Continue(String::new());
        }
        self.held.push_str(delta);

        // Earliest end wins, then the longest (earliest start). Matches can only lie in
        // `held`: anything emitted before had no stop-string prefix at its end.
        let mut best: Option<(usize, usize, usize)> = None; // (end, start, index)
        for (index, stop) in self.stops.iter().enumerate() {
            if let Some(start) = self.held.find(stop.as_str()) {
                let end = start + stop.len();
                let better = match best {
                    None => true,
                    Some((b_end, b_start, _)) => end < b_end || (end == b_end && start < b_start),
                };
                if better {
                    best = Some((end, start, index));
                }
            }
        }
        if let Some((_, start, index)) = best {
            self.stopped = true;
            let mut text = std::mem::take(&mut self.held);
            text.truncate(start);
            let stop = self.stops[index].clone();
            return StopOutcome::Stopped { text, stop };
        }

        let keep = self.partial_match_len();
        let emit_len = self.held.len() - keep;
        let rest = self.held.split_off(emit_len);
        let text = std::mem::replace(&mut self.held, rest);
        StopOutcome::Continue(text)
    }

    /// Generation ended for another reason (EOS, length): returns the held-back tail,
    /// which did not turn into a stop string after all.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of `held` that is a proper prefix of a stop string.
    fn partial_match_len(&self) -> usize {
        let max_stop = self.stops.iter().map(String::len).max().unwrap_or(0);
        let longest = max_stop.saturating_sub(1).min(self.held.len());
        // Try the longest candidate suffix first; suffixes start on char boundaries so
        // they are valid strings to compare.
        let mut from = self.held.len() - longest;
        while !self.held.is_char_boundary(from) {
            from += 1;
        }
        for (start, _) in self.held[from..].char_indices() {
            let suffix = &self.held[from + start..];
            if self
                .stops
                .iter()
                .any(|s| s.len() > suffix.len() && s.starts_with(suffix))
            {
                return suffix.len();
            }
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    fn cont(s: &str) -> StopOutcome {
        StopOutcome::Continue(s.to_string())
    }

    fn stopped(text: &str, stop: &str) -> StopOutcome {
        StopOutcome::Stopped {
            text: text.to_string(),
            stop: stop.to_string(),
        }
    }

    #[test]
    fn no_stops_passes_everything() {
        let mut m = matcher(&[]);
        assert!(m.is_empty());
        assert_eq!(m.push("abc"), cont("abc"));
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn stop_within_one_delta() {
        let mut m = matcher(&["STOP"]);
        assert_eq!(m.push("hello STOP world"), stopped("hello ", "STOP"));
        assert!(m.is_stopped());
        assert_eq!(m.push("more"), cont(""));
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn stop_spanning_deltas() {
        let mut m = matcher(&["</answer>"]);
        assert_eq!(m.push("The result is 4<"), cont("The result is 4"));
        assert_eq!(m.push("/ans"), cont(""));
        assert_eq!(m.push("wer> trailing"), stopped("", "</answer>"));
    }

    #[test]
    fn false_start_is_released() {
        let mut m = matcher(&["</answer>"]);
        assert_eq!(m.push("a </an"), cont("a "));
        assert_eq!(m.push("d> b"), cont("</and> b"));
        assert_eq!(m.push("</"), cont(""));
        assert_eq!(m.finish(), "</");
    }

    #[test]
    fn stop_that_is_a_prefix_of_another() {
        // "ab" completes first in "xabc": it wins over "abc".
        let mut m = matcher(&["abc", "ab"]);
        assert_eq!(m.push("xabc"), stopped("x", "ab"));
        // Streaming: "a" is held for both; "b" completes "ab".
        let mut m = matcher(&["abc", "ab"]);
        assert_eq!(m.push("xa"), cont("x"));
        assert_eq!(m.push("b"), stopped("", "ab"));
        // A longer stop that ends at the same place as a shorter one wins.
        let mut m = matcher(&["b", "ab"]);
        assert_eq!(m.push("xab"), stopped("x", "ab"));
        // The longer one only, when the text diverges from the shorter.
        let mut m = matcher(&["abc", "abd"]);
        assert_eq!(m.push("ab"), cont(""));
        assert_eq!(m.push("d"), stopped("", "abd"));
    }

    #[test]
    fn earliest_completion_wins() {
        let mut m = matcher(&["world", "lo"]);
        assert_eq!(m.push("hello world"), stopped("hel", "lo"));
    }

    #[test]
    fn multibyte_stop_strings_and_text() {
        let mut m = matcher(&["日本語"]);
        assert_eq!(m.push("é日"), cont("é"));
        assert_eq!(m.push("本"), cont(""));
        assert_eq!(m.push("人"), cont("日本人"));
        assert_eq!(m.push("日本"), cont(""));
        assert_eq!(m.push("語!"), stopped("", "日本語"));
    }

    #[test]
    fn empty_stop_strings_are_ignored() {
        let mut m = matcher(&["", "x"]);
        assert_eq!(m.push("ab"), cont("ab"));
        assert_eq!(m.push("cxd"), stopped("c", "x"));
    }

    #[test]
    fn held_tail_is_flushed_by_finish() {
        let mut m = matcher(&["\n\nUser:"]);
        assert_eq!(m.push("answer\n"), cont("answer"));
        assert_eq!(m.push("\nUs"), cont(""));
        assert_eq!(m.finish(), "\n\nUs");
    }

    #[test]
    fn one_character_at_a_time_matches_whole_text() {
        let text = "Sure! Here it is: 42 ### END ### ignored";
        let stops = ["###", "### END ###", "Here"];
        let mut whole = matcher(&stops);
        let expected = whole.push(text);
        let mut streamed = matcher(&stops);
        let mut out = String::new();
        let mut result = None;
        for c in text.chars() {
            match streamed.push(&c.to_string()) {
                StopOutcome::Continue(t) => out.push_str(&t),
                StopOutcome::Stopped { text, stop } => {
                    out.push_str(&text);
                    result = Some(stop);
                    break;
                }
            }
        }
        assert_eq!(expected, stopped("Sure! ", "Here"));
        assert_eq!(out, "Sure! ");
        assert_eq!(result.as_deref(), Some("Here"));
    }
}
