//! Prometheus text exposition format 0.0.4, written by hand for the
//! agent's and the hub's `GET /metrics`: a `# HELP`/`# TYPE` header per
//! metric family, then its samples, label values escaped.
//!
//! Invariant: every sample follows its family's header, and label values
//! are escaped (`\\`, `\"`, `\n`), so the output parses whatever the values.

use std::fmt::{Display, Write};

/// The `Content-Type` of the text this module writes.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// The `# TYPE` of a metric family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// A `/metrics` body being written.
#[derive(Default)]
pub struct Text {
    out: String,
}

/// One metric family's samples, after its header.
pub struct Family<'t, 'n> {
    out: &'t mut String,
    name: &'n str,
}

impl Text {
    /// Starts family `name` (its help text is one line) and returns it to
    /// add samples to.
    pub fn family<'t, 'n>(&'t mut self, name: &'n str, kind: Kind, help: &str) -> Family<'t, 'n> {
        // Writing to a String cannot fail.
        let _ = writeln!(
            self.out,
            "# HELP {name} {}\n# TYPE {name} {}",
            help.replace('\\', "\\\\").replace('\n', "\\n"),
            kind.as_str()
        );
        Family {
            out: &mut self.out,
            name,
        }
    }

    /// A counter with one unlabelled sample.
    pub fn counter(&mut self, name: &str, help: &str, value: impl Display) {
        self.family(name, Kind::Counter, help).sample(&[], value);
    }

    /// A gauge with one unlabelled sample.
    pub fn gauge(&mut self, name: &str, help: &str, value: impl Display) {
        self.family(name, Kind::Gauge, help).sample(&[], value);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

impl Family<'_, '_> {
    /// Adds `name{k="v",...} value` (no braces without labels).
    pub fn sample(&mut self, labels: &[(&str, &str)], value: impl Display) -> &mut Self {
        self.out.push_str(self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                for c in v.chars() {
                    match c {
                        '\\' => self.out.push_str("\\\\"),
                        '"' => self.out.push_str("\\\""),
                        '\n' => self.out.push_str("\\n"),
                        c => self.out.push(c),
                    }
                }
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(write: impl FnOnce(&mut Text), expected: &str) {
        let mut t = Text::default();
        write(&mut t);
        assert_eq!(t.finish(), expected);
    }

    #[test]
    fn families_and_samples() {
        check(
            |t| t.counter("a_total", "As seen.", 3u64),
            "# HELP a_total As seen.\n# TYPE a_total counter\na_total 3\n",
        );
        check(
            |t| t.gauge("g", "Ratio.", 2.5f64),
            "# HELP g Ratio.\n# TYPE g gauge\ng 2.5\n",
        );
        check(
            |t| t.gauge("g", "Whole floats print bare.", 1.0f64),
            "# HELP g Whole floats print bare.\n# TYPE g gauge\ng 1\n",
        );
        check(
            |t| {
                t.family("r", Kind::Gauge, "By state.")
                    .sample(&[("state", "a")], 1)
                    .sample(&[("state", "b"), ("why", "x")], 2);
            },
            "# HELP r By state.\n# TYPE r gauge\nr{state=\"a\"} 1\nr{state=\"b\",why=\"x\"} 2\n",
        );
        check(
            |t| {
                t.family("e", Kind::Counter, "No samples yet.");
            },
            "# HELP e No samples yet.\n# TYPE e counter\n",
        );
        check(
            |t| {
                t.family("q", Kind::Counter, "back\\slash\nnewline")
                    .sample(&[("v", "a\"b\\c\nd")], 0);
            },
            "# HELP q back\\\\slash\\nnewline\n# TYPE q counter\nq{v=\"a\\\"b\\\\c\\nd\"} 0\n",
        );
    }
}
