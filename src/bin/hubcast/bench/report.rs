//! A benchmark's result: the table people read and the JSON scripts read.

use std::fmt::Write;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::tally::Gap;
use super::wire::Target;
use super::Args;

/// What was counted, summed over every subscriber.
#[derive(Debug, Serialize)]
pub struct Counts {
    /// Messages the publishers were to send.
    pub planned: u64,
    /// Messages the publishers sent (fewer than planned if the run was cut short).
    pub published: u64,
    /// Deliveries a loss-free run makes: every published message to every subscriber.
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub out_of_order: u64,
    pub malformed: u64,
    /// Subscribers that missed one or more messages.
    pub short_subscribers: u64,
    /// Redis `PUBLISH` replies that counted fewer receivers than subscribers.
    pub short_publishes: u64,
}

/// The first subscriber (1-based) that missed messages, and where.
#[derive(Debug, Serialize)]
pub struct SubscriberGap {
    pub subscriber: usize,
    #[serde(flatten)]
    pub gap: Gap,
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub samples: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p99_9: u64,
    pub max: u64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub target: String,
    pub subscribers: usize,
    pub publishers: usize,
    pub size: usize,
    pub window: usize,
    /// Messages per second asked for; `None`: as fast as the window allows.
    pub rate: Option<usize>,
    #[serde(flatten)]
    pub counts: Counts,
    /// From the first publish to the last delivery.
    pub seconds: f64,
    pub connect_seconds: f64,
    pub deliveries_per_sec: f64,
    /// Delivered body bytes per second, in MB (10^6 bytes).
    pub mb_per_sec: f64,
    pub published_per_sec: f64,
    /// Microseconds from the publisher's write to the subscriber's read.
    pub latency_us: Latency,
    pub first_gap: Option<SubscriberGap>,
    pub errors: Vec<String>,
    pub error_count: u64,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        args: &Args,
        target: &Target,
        counts: Counts,
        elapsed: Duration,
        connect: Duration,
        latency: &Histogram<u64>,
        first_gap: Option<SubscriberGap>,
        errors: Vec<String>,
        error_count: u64,
    ) -> Self {
        let seconds = elapsed.as_secs_f64().max(1e-9);
        Report {
            target: target.to_string(),
            subscribers: args.subs,
            publishers: args.pubs,
            size: args.size,
            window: args.window,
            rate: args.rate,
            deliveries_per_sec: counts.delivered as f64 / seconds,
            mb_per_sec: (counts.delivered * args.size as u64) as f64 / seconds / 1e6,
            published_per_sec: counts.published as f64 / seconds,
            counts,
            seconds,
            connect_seconds: connect.as_secs_f64(),
            latency_us: Latency {
                samples: latency.len(),
                mean: latency.mean(),
                p50: latency.value_at_quantile(0.50),
                p90: latency.value_at_quantile(0.90),
                p99: latency.value_at_quantile(0.99),
                p99_9: latency.value_at_quantile(0.999),
                max: latency.max(),
            },
            first_gap,
            errors,
            error_count,
        }
    }

    /// Every subscriber got every message, once, intact and in order, without errors.
    pub fn ok(&self) -> bool {
        let c = &self.counts;
        c.published == c.planned
            && c.delivered == c.expected
            && c.lost == 0
            && c.out_of_order == 0
            && c.malformed == 0
            && c.short_publishes == 0
            && self.error_count == 0
    }

    pub fn table(&self) -> String {
        let c = &self.counts;
        let pace = match self.rate {
            Some(rate) => format!("at {} messages/s", group(rate as u64)),
            None => format!(
                "as fast as a {}-message window allows",
                group(self.window as u64)
            ),
        };
        let l = &self.latency_us;
        let mut out = String::new();
        let mut row = |label: &str, text: String| {
            let _ = writeln!(out, "{label:<14} {text}");
        };
        row("target", self.target.clone());
        row(
            "workload",
            format!(
                "{} subscriber(s), {} publisher(s), {} messages of {} B, {pace}",
                group(self.subscribers as u64),
                self.publishers,
                group(c.planned),
                group(self.size as u64)
            ),
        );
        row(
            "published",
            format!(
                "{} messages in {:.3} s ({}/s)",
                group(c.published),
                self.seconds,
                group(self.published_per_sec as u64)
            ),
        );
        row(
            "delivered",
            format!(
                "{} of {} in {:.3} s: {} deliveries/s, {:.1} MB/s",
                group(c.delivered),
                group(c.expected),
                self.seconds,
                group(self.deliveries_per_sec as u64),
                self.mb_per_sec
            ),
        );
        row(
            "latency (µs)",
            format!(
                "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (mean {:.1}, {} samples)",
                group(l.p50),
                group(l.p90),
                group(l.p99),
                group(l.p99_9),
                group(l.max),
                l.mean,
                group(l.samples)
            ),
        );
        row("check", self.verdict());
        for error in &self.errors {
            row("error", error.clone());
        }
        if self.error_count > self.errors.len() as u64 {
            row(
                "",
                format!("... {} more", self.error_count - self.errors.len() as u64),
            );
        }
        out
    }

    fn verdict(&self) -> String {
        let c = &self.counts;
        if self.ok() {
            return "OK: every subscriber got every message, once, intact and in order".into();
        }
        let mut problems = Vec::new();
        if c.lost > 0 || c.delivered < c.expected {
            let mut text = format!(
                "LOST {} deliveries ({} of {} subscribers short)",
                group(c.lost.max(c.expected.saturating_sub(c.delivered))),
                group(c.short_subscribers),
                group(self.subscribers as u64)
            );
            if let Some(SubscriberGap { subscriber, gap }) = &self.first_gap {
                let _ = write!(
                    text,
                    "; first gap: subscriber {subscriber} missed {} message(s) of publisher {} from #{}",
                    group(gap.missing),
                    gap.publisher + 1,
                    gap.from
                );
            }
            problems.push(text);
        }
        if c.published < c.planned {
            problems.push(format!(
                "stopped early: {} of {} messages published",
                group(c.published),
                group(c.planned)
            ));
        }
        if c.out_of_order > 0 {
            problems.push(format!(
                "{} duplicated or out of order",
                group(c.out_of_order)
            ));
        }
        if c.malformed > 0 {
            problems.push(format!("{} malformed", group(c.malformed)));
        }
        if c.short_publishes > 0 {
            problems.push(format!(
                "{} publishes reached fewer than every subscriber",
                group(c.short_publishes)
            ));
        }
        if self.error_count > 0 {
            problems.push(format!("{} error(s)", self.error_count));
        }
        format!("FAILED: {}", problems.join("; "))
    }
}

/// `1234567` as `1,234,567`.
fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::group;

    #[test]
    fn numbers_are_grouped_in_thousands() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(12_345_678), "12,345,678");
    }
}
