//! A reader of the Prometheus text exposition format (0.0.4), enough for assertions:
//! `# HELP` and `# TYPE` lines, and samples `name{label="value",...} value [timestamp]`.
//!
//! Whether the text is *valid* is promtool's verdict (`promtool_check_metrics`); this reader
//! only has to read valid text, and refuses anything it does not understand, so that a
//! format slip fails here with its line rather than as a confusing missing series.

use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};

/// A series' labels, sorted by name so that two label sets compare equal.
pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Labels,
    pub value: f64,
}

/// One rendering of `/metrics`, parsed.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    /// The `# TYPE` of each family: `counter`, `gauge`, `histogram`, ...
    pub types: HashMap<String, String>,
}

/// Labels from `("name", "value")` pairs.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

impl Exposition {
    pub fn parse(text: &str) -> Result<Exposition, String> {
        let mut exposition = Exposition::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_whitespace();
                if words.next() == Some("TYPE") {
                    let (Some(family), Some(kind)) = (words.next(), words.next()) else {
                        return Err(format!("line {}: bad TYPE line {line:?}", n + 1));
                    };
                    exposition.types.insert(family.to_owned(), kind.to_owned());
                }
                continue;
            }
            let sample =
                parse_sample(line).map_err(|e| format!("line {}: {e}: {line:?}", n + 1))?;
            exposition.samples.push(sample);
        }
        Ok(exposition)
    }

    /// Every series of the metric `name` (for a histogram: `name_bucket`, `name_count`...).
    pub fn series<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// The value of the series `name` with exactly `labels`.
    pub fn value(&self, name: &str, labels: &Labels) -> Option<f64> {
        self.series(name)
            .find(|s| &s.labels == labels)
            .map(|s| s.value)
    }

    /// How much each series of `name` grew since `before`, leaving out those that did not
    /// move. A series absent from `before` starts from 0: the exporter only shows a series
    /// once it has been touched.
    pub fn deltas(&self, before: &Exposition, name: &str) -> BTreeMap<Labels, f64> {
        self.series(name)
            .map(|s| {
                let was = before.value(name, &s.labels).unwrap_or(0.0);
                (s.labels.clone(), s.value - was)
            })
            .filter(|(_, delta)| *delta != 0.0)
            .collect()
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Labels::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        rest = parse_labels(after_brace, &mut labels)?;
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or("no value")?;
    let value = parse_value(value)?;
    if let Some(timestamp) = fields.next() {
        timestamp
            .parse::<i64>()
            .map_err(|_| format!("bad timestamp {timestamp:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing text after the value".into());
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Reads `label="value",...}` into `labels`; returns what follows the `}`.
fn parse_labels<'a>(mut rest: &'a str, labels: &mut Labels) -> Result<&'a str, String> {
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Ok(after);
        }
        let eq = rest.find('=').ok_or("label without '='")?;
        let name = rest[..eq].trim();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .trim_start()
            .strip_prefix('"')
            .ok_or("label value is not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?} in a label value")),
                },
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name:?} given twice"));
        }
        rest = rest[end + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

fn parse_value(raw: &str) -> Result<f64, String> {
    match raw {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => raw.parse().map_err(|_| format!("bad value {raw:?}")),
    }
}

/// Pipes `text` to `promtool check metrics`. Lint findings (naming advice, missing HELP)
/// are returned for the report; a text promtool cannot parse is an `Err`.
pub fn promtool_check_metrics(text: &str) -> Result<Vec<String>, String> {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package prometheus; scripts/test installs it)");
    child
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool ran");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Exit status 0: clean; 3: lint findings only (naming advice, missing HELP); anything
    // else, or "error while linting: text format parsing error in line N", is unreadable.
    match out.status.code() {
        Some(0 | 3) if !said.contains("error while linting") => {
            Ok(said.lines().map(str::to_owned).collect())
        }
        _ => Err(format!("promtool exited with {}: {said}", out.status)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_samples_labels_escapes_and_types() {
        let text = "# HELP a_total Things.\n# TYPE a_total counter\n\
                    a_total{route=\"/items/{id}\",x=\"q\\\"\\\\\\n\"} 3\n\
                    b 1.5e-3 1700000000\nc_bucket{le=\"+Inf\"} +Inf\n";
        let e = Exposition::parse(text).unwrap();
        assert_eq!(e.types.get("a_total").map(String::as_str), Some("counter"));
        assert_eq!(
            e.value(
                "a_total",
                &labels(&[("route", "/items/{id}"), ("x", "q\"\\\n")])
            ),
            Some(3.0)
        );
        assert_eq!(e.value("b", &Labels::new()), Some(0.0015));
        assert_eq!(
            e.value("c_bucket", &labels(&[("le", "+Inf")])),
            Some(f64::INFINITY)
        );
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        for bad in [
            "a{x=1} 2",
            "a{x=\"1\" 2",
            "a",
            "a 1 2 3",
            "a{x=\"1\",x=\"2\"} 1",
        ] {
            assert!(Exposition::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn deltas_count_new_series_from_zero_and_skip_still_ones() {
        let before = Exposition::parse("a{k=\"x\"} 2\na{k=\"y\"} 5\n").unwrap();
        let after = Exposition::parse("a{k=\"x\"} 2\na{k=\"y\"} 7\na{k=\"z\"} 1\n").unwrap();
        let deltas = after.deltas(&before, "a");
        assert_eq!(deltas.len(), 2);
        assert_eq!(deltas.get(&labels(&[("k", "y")])), Some(&2.0));
        assert_eq!(deltas.get(&labels(&[("k", "z")])), Some(&1.0));
    }
}
