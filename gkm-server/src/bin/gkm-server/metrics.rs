//! The Prometheus exposition, through the `prometheus-client` crate: each scrape registers the
//! families from a snapshot of the controller's counters and encodes them (OpenMetrics text:
//! `# HELP`, `# TYPE`, the samples of each family together, `# EOF`). A counter family
//! `gkm_NAME` has its samples as `gkm_NAME_total`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The Content-Type of [`Exposition::encode`]'s text.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A sample's labels: (name, escaped value) pairs.
pub(crate) type Labels = Vec<(&'static str, String)>;

/// One label, its value escaped as the format asks (backslash, quote, newline): the crate's
/// text encoder (0.24) writes label values as they are.
pub(crate) fn label(name: &'static str, value: &str) -> Labels {
    let escaped = value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    vec![(name, escaped)]
}

/// What a family measures.
#[derive(Clone, Copy)]
pub(crate) enum Kind {
    /// Only goes up (until the daemon restarts).
    Counter,
    /// Goes up and down.
    Gauge,
}

/// One scrape's families, under the prefix `gkm`.
pub(crate) struct Exposition(Registry);

impl Default for Exposition {
    fn default() -> Self {
        Exposition(Registry::with_prefix("gkm"))
    }
}

impl Exposition {
    /// Family `gkm_NAME` of `kind`, with its samples (labels, value). A counter's `NAME` is
    /// given without `_total`: its samples get it. The encoder ends `help` with a period.
    pub(crate) fn family(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, u64)>,
    ) {
        let help = help.strip_suffix('.').unwrap_or(help);
        match kind {
            Kind::Counter => {
                let family = Family::<Labels, Counter<u64, AtomicU64>>::default();
                for (labels, value) in samples {
                    family.get_or_create(&labels).inc_by(value);
                }
                self.0.register(name, help, family);
            }
            Kind::Gauge => {
                let family = Family::<Labels, Gauge<u64, AtomicU64>>::default();
                for (labels, value) in samples {
                    family.get_or_create(&labels).set(value);
                }
                self.0.register(name, help, family);
            }
        }
    }

    /// The OpenMetrics text.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.0);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_have_help_type_and_escaped_labels() {
        let mut e = Exposition::default();
        e.family(
            "rekeys",
            Kind::Counter,
            "Rekeys made.",
            [(label("group", "a\"b\\c\nd"), 3)],
        );
        e.family(
            "members",
            Kind::Gauge,
            "Current members.",
            [(label("group", "a"), 2)],
        );
        let text = e.encode();
        assert!(text.contains("# HELP gkm_rekeys Rekeys made.\n"), "{text}");
        assert!(text.contains("# TYPE gkm_rekeys counter\n"), "{text}");
        assert!(
            text.contains("gkm_rekeys_total{group=\"a\\\"b\\\\c\\nd\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE gkm_members gauge\n"), "{text}");
        assert!(text.contains("gkm_members{group=\"a\"} 2\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
