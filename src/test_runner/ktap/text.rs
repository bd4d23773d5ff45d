//! Line splitting and line classification, written to match exactly what kunit.py's Python
//! does: `str.splitlines()`, `errors='backslashreplace'` decoding, `str.rstrip()`, and the
//! regular expressions of `kunit_parser.py` (hand-written here: each one is a few string
//! tests, linear in the line length, no backtracking).

/// Splits a byte stream into lines where Python's `str.splitlines()` would, across chunk
/// boundaries. Keeps at most `max_line` bytes of a line; the rest of it is dropped.
#[derive(Debug)]
pub(super) struct LineSplitter {
    max_line: usize,
    buf: Vec<u8>,
    /// Lead bytes of a possible multi-byte terminator (U+0085: C2 85; U+2028/9: E2 80 A8/A9).
    held: [u8; 2],
    held_len: usize,
    /// The last byte was `\r`: a `\n` right after it belongs to the same line break.
    after_cr: bool,
}

impl LineSplitter {
    pub(super) fn new(max_line: usize) -> Self {
        LineSplitter {
            max_line,
            buf: Vec::new(),
            held: [0; 2],
            held_len: 0,
            after_cr: false,
        }
    }

    /// Splits `bytes`, calling `line` with each complete line (without its terminator).
    pub(super) fn feed(&mut self, bytes: &[u8], mut line: impl FnMut(&[u8])) {
        for &b in bytes {
            if std::mem::take(&mut self.after_cr) && b == b'\n' {
                continue;
            }
            match (&self.held[..self.held_len], b) {
                ([0xC2], 0x85) | ([0xE2, 0x80], 0xA8 | 0xA9) => {
                    self.held_len = 0;
                    self.emit(&mut line);
                    continue;
                }
                ([0xE2], 0x80) => {
                    self.held = [0xE2, 0x80];
                    self.held_len = 2;
                    continue;
                }
                _ => self.release_held(),
            }
            match b {
                b'\n' | 0x0B | 0x0C | 0x1C..=0x1E => self.emit(&mut line),
                b'\r' => {
                    self.emit(&mut line);
                    self.after_cr = true;
                }
                0xC2 | 0xE2 => {
                    self.held = [b, 0];
                    self.held_len = 1;
                }
                _ => self.push(b),
            }
        }
    }

    /// Ends the stream: a last line without a terminator is still a line.
    pub(super) fn finish(&mut self, mut line: impl FnMut(&[u8])) {
        self.release_held();
        if !self.buf.is_empty() {
            self.emit(&mut line);
        }
    }

    /// Bytes held for the current line.
    #[cfg(test)]
    pub(super) fn buffered(&self) -> usize {
        self.buf.len() + self.held_len
    }

    fn release_held(&mut self) {
        let held = self.held;
        for &b in &held[..self.held_len] {
            self.push(b);
        }
        self.held_len = 0;
    }

    fn push(&mut self, b: u8) {
        if self.buf.len() < self.max_line {
            self.buf.push(b);
        }
    }

    fn emit(&mut self, line: &mut impl FnMut(&[u8])) {
        line(&self.buf);
        self.buf.clear();
    }
}

/// Decodes UTF-8 the way Python's `errors='backslashreplace'` does: each byte of an invalid
/// sequence becomes the four characters `\xNN`.
pub(super) fn decode_backslashreplace(mut bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    loop {
        match std::str::from_utf8(bytes) {
            Ok(s) => {
                out.push_str(s);
                return out;
            }
            Err(e) => {
                let (valid, rest) = bytes.split_at(e.valid_up_to());
                // `valid` is the prefix from_utf8 just validated; this cannot fall back.
                out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                let bad = e.error_len().unwrap_or(rest.len());
                for b in &rest[..bad] {
                    out.push_str(&format!("\\x{b:02x}"));
                }
                bytes = &rest[bad..];
            }
        }
    }
}

/// Python's `str.isspace()` (and regex `\s`): Unicode White_Space plus `\x1c`-`\x1f`.
fn is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.rstrip()`.
pub(super) fn rstrip(s: &str) -> &str {
    s.trim_end_matches(is_space)
}

/// What `^\s*` consumes.
fn lstrip(s: &str) -> &str {
    s.trim_start_matches(is_space)
}

/// `s[n:]` in Python: drops the first `n` characters.
pub(super) fn skip_chars(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[i..],
        None => "",
    }
}

/// At most the first `n` characters of `s`.
pub(super) fn truncate_chars(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A decimal number as Python's `int()` reads `[0-9]+`; `None` past `u64::MAX`.
pub(super) fn parse_u64(digits: &str) -> Option<u64> {
    digits.bytes().try_fold(0u64, |n, d| {
        n.checked_mul(10)?
            .checked_add(u64::from(d.wrapping_sub(b'0')))
    })
}

/// Splits `s` into its leading ASCII digits and the rest.
fn split_digits(s: &str) -> (&str, &str) {
    let n = s.bytes().take_while(u8::is_ascii_digit).count();
    s.split_at(n)
}

/// `re.search(r'\s*KIND version ([0-9]+)$', line)` — the line ends in a version line —
/// returning what kunit.py then cuts from every line: the number of characters before the
/// first occurrence of `KIND version` (`len(line.split('KIND version')[0])`).
pub(super) fn version_search(line: &str, kind: &str) -> Option<usize> {
    let before_digits = line.trim_end_matches(|c: char| c.is_ascii_digit());
    if before_digits.len() == line.len() {
        return None;
    }
    let keyword = format!("{kind} version");
    if !before_digits.ends_with(&format!("{keyword} ")) {
        return None;
    }
    let first = line.find(&keyword)?;
    Some(line[..first].chars().count())
}

/// `KTAP_START.match` / `TAP_START.match`: `^\s*(K)TAP version ([0-9]+)$`. Returns the kind
/// and the version (`None` when it does not fit in a u64).
pub(super) fn version_line(line: &str) -> Option<(&'static str, Option<u64>)> {
    let s = lstrip(line);
    let (kind, rest) = if let Some(rest) = s.strip_prefix("KTAP version ") {
        ("KTAP", rest)
    } else {
        ("TAP", s.strip_prefix("TAP version ")?)
    };
    let (digits, tail) = split_digits(rest);
    (!digits.is_empty() && tail.is_empty()).then(|| (kind, parse_u64(digits)))
}

/// `TEST_HEADER`: `^\s*# Subtest: (.*)$`.
pub(super) fn subtest_header(line: &str) -> Option<&str> {
    lstrip(line).strip_prefix("# Subtest: ")
}

/// `TEST_PLAN`: `^\s*1\.\.([0-9]+)` (nothing is required after the digits). Saturates.
pub(super) fn plan(line: &str) -> Option<u64> {
    let (digits, _) = split_digits(lstrip(line).strip_prefix("1..")?);
    (!digits.is_empty()).then(|| parse_u64(digits).unwrap_or(u64::MAX))
}

/// kunit.py's `parse_diagnostic` stops at result, subtest header and version lines. In a
/// frame at the depth limit (`capped`), only result lines stop it.
pub(super) fn is_diagnostic(line: &str, capped: bool) -> bool {
    if ResultLine::parse(line).is_some() {
        return false;
    }
    capped || (subtest_header(line).is_none() && version_line(line).is_none())
}

/// `peek_test_name_match`: a result line whose name is `name`.
pub(super) fn result_name_is(line: &str, name: &str) -> bool {
    ResultLine::parse(line).is_some_and(|r| r.name == name)
}

/// A line matching kunit.py's `TEST_RESULT`:
/// `^\s*(ok|not ok) ([0-9]+) (- )?([^#]*)( # .*)?$`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ResultLine<'a> {
    pub(super) ok: bool,
    pub(super) number: &'a str,
    /// Group 4 of `TEST_RESULT`: the description up to ` # `.
    pub(super) name: &'a str,
    /// Group 5 without its leading ` # `.
    pub(super) directive: Option<&'a str>,
    /// Group 4 of `TEST_RESULT_SKIP`, `^\s*(ok|not ok) ([0-9]+) (- )?(.*) # SKIP(.*)$`, when
    /// that matches too: the test is skipped and this is its name.
    pub(super) skip_name: Option<&'a str>,
}

impl<'a> ResultLine<'a> {
    pub(super) fn parse(line: &'a str) -> Option<Self> {
        let s = lstrip(line);
        let (ok, s) = if let Some(s) = s.strip_prefix("ok ") {
            (true, s)
        } else {
            (false, s.strip_prefix("not ok ")?)
        };
        let (number, s) = split_digits(s);
        let rest = s.strip_prefix(' ').filter(|_| !number.is_empty())?;
        // `(- )?` is tried first; if the rest cannot match after it, without it.
        let starts = if rest.starts_with("- ") {
            &[2, 0][..]
        } else {
            &[0][..]
        };
        let (name, directive) = starts
            .iter()
            .find_map(|&start| name_and_directive(rest, start))?;
        let skip_name = starts.iter().find_map(|&start| skip_name(rest, start));
        Some(ResultLine {
            ok,
            number,
            name,
            directive,
            skip_name,
        })
    }
}

/// `([^#]*)( # .*)?$` on `rest[start..]`: the name runs to the first `#`, which must be
/// preceded and followed by a space (the space before it leaves the name).
fn name_and_directive(rest: &str, start: usize) -> Option<(&str, Option<&str>)> {
    let tail = &rest[start..];
    let Some(hash) = tail.find('#') else {
        return Some((tail, None));
    };
    let name = tail[..hash].strip_suffix(' ')?;
    let directive = tail[hash + 1..].strip_prefix(' ')?;
    Some((name, Some(directive)))
}

/// `(.*) # SKIP(.*)$` on `rest[start..]`: greedy, so the name runs to the last ` # SKIP`.
fn skip_name(rest: &str, start: usize) -> Option<&str> {
    let tail = &rest[start..];
    tail.rfind(" # SKIP").map(|i| &tail[..i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]], max: usize) -> Vec<String> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, |l| out.push(decode_backslashreplace(l)));
        }
        s.finish(|l| out.push(decode_backslashreplace(l)));
        out
    }

    #[test]
    fn splitter_matches_python_splitlines_terminators() {
        let input = "a\r\nb\rc\nd\x0be\x0cf\x1cg\x1dh\x1ei\u{85}j\u{2028}k\u{2029}l\r\r\nm\n";
        let got = split(&[input.as_bytes()], 100);
        assert_eq!(
            got,
            ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "", "m"]
        );
    }

    #[test]
    fn splitter_joins_terminators_split_across_chunks() {
        let got = split(&[b"a\r", b"\nb\xe2", b"\x80", b"\xa8c\xc2", b"\x85d"], 100);
        assert_eq!(got, ["a", "b", "c", "d"]);
    }

    #[test]
    fn splitter_keeps_lead_bytes_that_are_not_terminators() {
        let got = split(&[b"\xc2\xa9 x\xe2\x80\x94y\xe2\xe2\x80\xa8z"], 100);
        assert_eq!(got, ["\u{a9} x\u{2014}y\\xe2", "z"]);
    }

    #[test]
    fn splitter_truncates_long_lines_but_still_splits() {
        let mut long = vec![b'x'; 1000];
        long.extend_from_slice(b"\nshort");
        let got = split(&[&long], 10);
        assert_eq!(got, ["xxxxxxxxxx", "short"]);
    }

    #[test]
    fn invalid_utf8_becomes_backslash_escapes_per_byte() {
        assert_eq!(
            decode_backslashreplace(b"a\xffb\xed\xa0\x80c"),
            "a\\xffb\\xed\\xa0\\x80c"
        );
        assert_eq!(
            decode_backslashreplace(b"ok \xf0\x9f\x98"),
            "ok \\xf0\\x9f\\x98"
        );
    }

    #[test]
    fn rstrip_removes_python_whitespace_including_file_separators() {
        assert_eq!(rstrip("ok 1 a \t\u{1f}\u{a0}\u{3000}"), "ok 1 a");
        assert_eq!(rstrip("x\u{200b}"), "x\u{200b}");
    }

    #[test]
    fn version_search_returns_prefix_of_first_occurrence() {
        assert_eq!(
            version_search("[    0.06] KTAP version 1", "KTAP"),
            Some(11)
        );
        assert_eq!(version_search("KTAP version 14", "TAP"), Some(1));
        assert_eq!(
            version_search("KTAP version x KTAP version 1", "KTAP"),
            Some(0)
        );
        assert_eq!(version_search("KTAP version 1a", "KTAP"), None);
        assert_eq!(version_search("KTAP version ", "KTAP"), None);
    }

    #[test]
    fn result_line_follows_kunit_regexes() {
        let r = ResultLine::parse("\tnot ok 3 - foo bar # TIMEOUT 45 seconds").unwrap();
        assert_eq!(
            (r.ok, r.number, r.name, r.directive, r.skip_name),
            (false, "3", "foo bar", Some("TIMEOUT 45 seconds"), None)
        );
        let r = ResultLine::parse("ok 2 t # SKIP no hw").unwrap();
        assert_eq!((r.name, r.skip_name), ("t", Some("t")));
        let r = ResultLine::parse("ok 2 t # x # SKIP y").unwrap();
        assert_eq!((r.name, r.skip_name), ("t", Some("t # x")));
        let r = ResultLine::parse("ok 1 - # x").unwrap();
        assert_eq!(r.name, "-");
        assert_eq!(ResultLine::parse("ok 1 -").unwrap().name, "-");
        assert_eq!(ResultLine::parse("ok 1 - a").unwrap().name, "a");
        assert_eq!(ResultLine::parse("ok 1  # SKIP").unwrap().name, "");
    }

    #[test]
    fn lines_kunit_does_not_take_as_results_are_not_results() {
        for l in [
            "ok 1",
            "ok 1 # SKIP no name",
            "ok 1 a#b",
            "ok 1 a #b",
            "ok a",
            "okay 1 x",
            "# ok 1 x",
            "not ok1 x",
        ] {
            assert!(ResultLine::parse(l).is_none(), "{l}");
        }
    }

    #[test]
    fn plan_and_header_and_version_lines() {
        assert_eq!(plan("  1..3"), Some(3));
        assert_eq!(plan("1..3 # comment"), Some(3));
        assert_eq!(plan("1..99999999999999999999999"), Some(u64::MAX));
        assert_eq!(plan("1.."), None);
        assert_eq!(plan("2..3"), None);
        assert_eq!(subtest_header("    # Subtest: s"), Some("s"));
        assert_eq!(subtest_header("#Subtest: s"), None);
        assert_eq!(version_line("  KTAP version 1"), Some(("KTAP", Some(1))));
        assert_eq!(version_line("TAP version 14"), Some(("TAP", Some(14))));
        assert_eq!(version_line("# TAP version 13"), None);
        assert_eq!(version_line("KTAP version 1 "), None);
    }
}
