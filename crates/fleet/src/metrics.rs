//! Prometheus exposition of the fleet: traffic per role and per instance, and health.

use std::sync::atomic::Ordering;

use phoenix_proxy::{Exposition, Scope, label};

use crate::controller::Controller;

impl Controller {
    /// Every role's and every instance's metrics in the Prometheus text format.
    pub async fn metrics_text(&self) -> String {
        let mut out = Exposition::default();
        for denied in self.denied().await {
            let labels = match &denied.from {
                phoenix_driver::Source::Role(from) => format!(
                    "to=\"{}\",kind=\"role\",from=\"{}\"",
                    label(&denied.to),
                    label(from)
                ),
                other => format!("to=\"{}\",kind=\"{}\"", label(&denied.to), other.kind()),
            };
            out.sample(
                "phoenix_policy_denied_total",
                "counter",
                "Connection attempts the network policy refused (packets), by guarded role and source.",
                "",
                &labels,
                denied.packets,
            );
        }
        let dropped = self.inner.capture.dropped();
        for role in self.inner.roles() {
            let role_label = format!("role=\"{}\"", label(&role.name));
            let generations: Vec<_> = role.live().into_iter().chain(role.others()).collect();
            let instances: Vec<_> = generations
                .iter()
                .flat_map(|g| g.instances().into_iter().map(move |i| (g.clone(), i)))
                .collect();
            let in_flight = instances.iter().map(|(_, i)| i.backend.in_flight()).sum();
            out.traffic(Scope::Role, &role_label, &role.proxy.metrics, in_flight);
            let stats = &role.proxy.stats;
            let retries = stats.retries.load(Ordering::Relaxed);
            out.sample(
                "phoenix_role_retries_total",
                "counter",
                "Attempts moved to another instance.",
                "",
                &role_label,
                retries,
            );
            let errors = stats.proxy_errors.load(Ordering::Relaxed);
            let help =
                "Answers the proxy made itself (no instance could answer: 413, 502, 503, 504).";
            out.sample(
                "phoenix_role_proxy_errors_total",
                "counter",
                help,
                "",
                &role_label,
                errors,
            );
            let live = role.live().map_or(0, |g| g.id);
            let help = "From a membership or health change to the first request routed accordingly, in seconds.";
            out.histogram(
                "phoenix_role_reconfiguration_seconds",
                help,
                &role_label,
                &role.proxy.reconfiguration,
            );
            out.sample(
                "phoenix_role_live_generation",
                "gauge",
                "The generation serving the role.",
                "",
                &role_label,
                live,
            );
            out.sample(
                "phoenix_logs_dropped_total",
                "counter",
                "Lines of the role's instances dropped because the log store fell behind.",
                "",
                &role_label,
                dropped.get(&role.name).copied().unwrap_or(0),
            );
            for (generation, instance) in &instances {
                let labels = format!(
                    "{role_label},instance=\"{}\",generation=\"{}\",image=\"{}\"",
                    label(&instance.name),
                    generation.id,
                    phoenix_image::short_digest(&generation.image)
                );
                out.traffic(
                    Scope::Backend,
                    &labels,
                    &instance.backend.metrics,
                    instance.backend.in_flight(),
                );
                let healthy = u8::from(instance.is_healthy());
                out.sample(
                    "phoenix_instance_healthy",
                    "gauge",
                    "1 when the instance passes its health check.",
                    "",
                    &labels,
                    healthy,
                );
                let (cpu, memory) = instance.usage();
                if let Some(cpu) = cpu {
                    let help = "CPU the instance used over the last second, in cores.";
                    out.sample(
                        "phoenix_instance_cpu_cores",
                        "gauge",
                        help,
                        "",
                        &labels,
                        cpu,
                    );
                }
                if let Some(memory) = memory {
                    let help = "Resident memory of the instance, in bytes.";
                    out.sample(
                        "phoenix_instance_memory_bytes",
                        "gauge",
                        help,
                        "",
                        &labels,
                        memory,
                    );
                }
            }
        }
        let forwarding = self.inner.forwarding.lock().await;
        for (sink, stats) in forwarding.stats() {
            let labels = format!("sink=\"{}\"", label(sink));
            let counters = [
                (
                    "phoenix_logs_forwarded_total",
                    "Lines a [logs.forward] sink confirmed (sent again after an outage: counted again).",
                    stats.sent.load(Ordering::Relaxed),
                ),
                (
                    "phoenix_logs_forward_failures_total",
                    "Failed attempts to send to a [logs.forward] sink (each is retried).",
                    stats.failures.load(Ordering::Relaxed),
                ),
                (
                    "phoenix_logs_forward_rejected_total",
                    "Lines a [logs.forward] sink refused for good (HTTP 4xx); they stay in the store.",
                    stats.rejected.load(Ordering::Relaxed),
                ),
            ];
            for (name, help, value) in counters {
                out.sample(name, "counter", help, "", &labels, value);
            }
        }
        drop(forwarding);
        let webhooks = self.inner.webhooks.lock().await;
        for (webhook, stats) in webhooks.stats() {
            let labels = format!("webhook=\"{}\"", label(webhook));
            let counters = [
                (
                    "phoenix_webhook_delivered_total",
                    "Journal events a [webhook] receiver answered with 2xx.",
                    stats.delivered.load(Ordering::Relaxed),
                ),
                (
                    "phoenix_webhook_failures_total",
                    "Failed attempts to send to a [webhook] receiver.",
                    stats.failures.load(Ordering::Relaxed),
                ),
                (
                    "phoenix_webhook_given_up_total",
                    "Journal events a [webhook] gave up on (journaled as webhook.failed).",
                    stats.given_up.load(Ordering::Relaxed),
                ),
            ];
            for (name, help, value) in counters {
                out.sample(name, "counter", help, "", &labels, value);
            }
        }
        out.render()
    }
}
