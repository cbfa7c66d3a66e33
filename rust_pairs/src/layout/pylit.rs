//! A small, safe reader of Python literals (`str()` of dicts, lists, strings, numbers, `True`,
//! `False`, `None`), as MM-DPO's DPO file stores some turns: `"{'from': 'gpt', 'value': '...'}"`.
//! Nothing is evaluated; anything else is an error. Nesting is bounded.

use serde_json::{Map, Number, Value};

const MAX_DEPTH: usize = 64;

/// Parse a whole string as one Python literal.
pub fn parse(s: &str) -> Result<Value, String> {
    let mut p = P { s: s.as_bytes(), src: s, i: 0 };
    let v = p.value(0)?;
    p.ws();
    if p.i != p.s.len() {
        return Err(format!("unexpected text at byte {}", p.i));
    }
    Ok(v)
}

struct P<'a> {
    s: &'a [u8],
    src: &'a str,
    i: usize,
}

impl P<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, String> {
        if depth > MAX_DEPTH {
            return Err("nested too deeply".into());
        }
        self.ws();
        match self.s.get(self.i) {
            None => Err("unexpected end".into()),
            Some(b'{') => {
                self.i += 1;
                let mut m = Map::new();
                loop {
                    if self.eat(b'}') {
                        return Ok(Value::Object(m));
                    }
                    let k = match self.value(depth + 1)? {
                        Value::String(k) => k,
                        other => return Err(format!("dict key {other} is not a string")),
                    };
                    if !self.eat(b':') {
                        return Err(format!("expected ':' at byte {}", self.i));
                    }
                    let v = self.value(depth + 1)?;
                    m.insert(k, v);
                    if !self.eat(b',') {
                        return if self.eat(b'}') { Ok(Value::Object(m)) } else { Err(format!("expected ',' or '}}' at byte {}", self.i)) };
                    }
                }
            }
            Some(&open @ (b'[' | b'(')) => {
                self.i += 1;
                let close = if open == b'[' { b']' } else { b')' };
                let mut a = Vec::new();
                loop {
                    if self.eat(close) {
                        return Ok(Value::Array(a));
                    }
                    a.push(self.value(depth + 1)?);
                    if !self.eat(b',') {
                        return if self.eat(close) { Ok(Value::Array(a)) } else { Err(format!("expected ',' or '{}' at byte {}", close as char, self.i)) };
                    }
                }
            }
            Some(b'\'' | b'"') => self.string().map(Value::String),
            Some(_) => self.word(),
        }
    }

    fn string(&mut self) -> Result<String, String> {
        let q = self.s[self.i];
        self.i += 1;
        let mut out = String::new();
        loop {
            // Copy the run up to the next quote or backslash (UTF-8 stays intact: both are ASCII).
            let start = self.i;
            while self.i < self.s.len() && self.s[self.i] != q && self.s[self.i] != b'\\' {
                self.i += 1;
            }
            out.push_str(&self.src[start..self.i]);
            match self.s.get(self.i) {
                None => return Err("unterminated string".into()),
                Some(&c) if c == q => {
                    self.i += 1;
                    return Ok(out);
                }
                Some(_) => {
                    self.i += 1;
                    let c = *self.s.get(self.i).ok_or("unterminated escape")?;
                    self.i += 1;
                    match c {
                        b'n' => out.push('\n'),
                        b't' => out.push('\t'),
                        b'r' => out.push('\r'),
                        b'0' => out.push('\0'),
                        b'\\' | b'\'' | b'"' => out.push(c as char),
                        b'\n' => {}
                        b'x' => out.push(self.hex(2)?),
                        b'u' => out.push(self.hex(4)?),
                        b'U' => out.push(self.hex(8)?),
                        // Python keeps unknown escapes as written.
                        _ => {
                            out.push('\\');
                            self.i -= 1;
                        }
                    }
                }
            }
        }
    }

    fn hex(&mut self, n: usize) -> Result<char, String> {
        let h = self.src.get(self.i..self.i + n).ok_or("truncated escape")?;
        let x = u32::from_str_radix(h, 16).map_err(|_| format!("bad escape \\{h}"))?;
        self.i += n;
        char::from_u32(x).ok_or_else(|| format!("escape {x:#x} is not a character"))
    }

    fn word(&mut self) -> Result<Value, String> {
        let start = self.i;
        while self.i < self.s.len() && !b",:]})".contains(&self.s[self.i]) && !self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
        let w = &self.src[start..self.i];
        match w {
            "True" => Ok(Value::Bool(true)),
            "False" => Ok(Value::Bool(false)),
            "None" => Ok(Value::Null),
            _ => {
                if let Ok(i) = w.parse::<i64>() {
                    return Ok(Value::Number(i.into()));
                }
                match w.parse::<f64>().ok().and_then(Number::from_f64) {
                    Some(n) if !w.is_empty() => Ok(Value::Number(n)),
                    _ => Err(format!("not a literal: {w:?}")),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse;
    use serde_json::json;

    #[test]
    fn python_str_of_a_turn() {
        let s = r#"{'from': 'gpt', 'value': "It's a \"cat\".\nDone \u00e9 é"}"#;
        assert_eq!(parse(s).unwrap(), json!({"from": "gpt", "value": "It's a \"cat\".\nDone é é"}));
        assert_eq!(parse("[{'a': 1, 'b': -2.5e0, 'c': None, 'd': (True, False)}]").unwrap(),
            json!([{"a": 1, "b": -2.5, "c": null, "d": [true, false]}]));
        assert_eq!(parse(r"'a\qb'").unwrap(), json!("a\\qb"));
    }

    #[test]
    fn rejects_code_and_garbage() {
        for bad in ["__import__('os').system('x')", "{'a': f(1)}", "{'a' 1}", "'open", "{1: 2}", "[1, 2", "{'a': 1} extra", "nan_"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let deep = "[".repeat(100) + &"]".repeat(100);
        assert!(parse(&deep).unwrap_err().contains("deeply"));
    }

    #[test]
    fn never_panics_on_arbitrary_text() {
        let alphabet: Vec<char> = "{}[]()'\"\\:, xuU0aé€𝄞-.eTrueFalsNn\n".chars().collect();
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..20_000 {
            let len = (x % 24) as usize;
            let s: String = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    alphabet[(x % alphabet.len() as u64) as usize]
                })
                .collect();
            let _ = parse(&s);
        }
    }
}
