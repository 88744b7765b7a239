#!/usr/bin/env python3
"""Writes hopwatch's Grafana dashboards (the *.json files beside this script).

The JSON is generated so every hop query follows the same rules:
- `$node`, `$namespace` and `$workload` select a hop when EITHER end matches (a hop into a
  workload and a hop out of it both belong to it): each selection is the union (`or`) of the
  source-side and the destination-side selection, which are identical when a variable is "All".
- Counts both ends report (reporter="client" / "server") are not added: a hop takes the larger of
  the two (equal when both ends are traced; the one that exists otherwise).
- Latency panels use the client side (what callers wait, network included) unless titled
  otherwise.

Run `python3 dashboards/generate.py` after editing; the end-to-end test evaluates every query of
the generated files against a real Prometheus.
"""

import json
import pathlib

HOP = "source_namespace, source_workload, destination_namespace, destination_workload, destination_port"
HOP_LEGEND = "{{source_workload}} → {{destination_namespace}}/{{destination_workload}}:{{destination_port}}"
RI = "$__rate_interval"
CLIENT = 'reporter="client"'
SERVER = 'reporter="server"'
DNS_CLIENT = 'protocol="dns", reporter="client"'
NXDOMAIN = 'rcode="NXDOMAIN"'
ACTIVITY = 'event=~"tcp_state_changes|kfree_skb_calls|sock_ops_calls|data_events"'
KERNEL_ERRORS = ('event=~"ringbuf_full|read_failed|conn_map_full|drop_rate_limited|data_truncated|'
                 'tls_unassociated|l7_unsupported_calls"')
DS = {"type": "prometheus", "uid": "${datasource}"}


def sel(side, extra=""):
    parts = ['node=~"$node"', f'{side}_namespace=~"$namespace"', f'{side}_workload=~"$workload"']
    if extra:
        parts.append(extra)
    return "{" + ", ".join(parts) + "}"


def either(fn):
    """fn(selector) for the source side `or` the destination side."""
    return f"({fn(sel('source'))} or {fn(sel('destination'))})"


def either_extra(fn, extra):
    return f"({fn(sel('source', extra))} or {fn(sel('destination', extra))})"


def hop_rate(metric, by=HOP, extra=""):
    """Per-second rate by `by`, the larger of the two reporters."""
    inner = lambda s: f"sum by ({by}, reporter) (rate({metric}{s}[{RI}]))"
    return f"max by ({by}) ({either_extra(inner, extra) if extra else either(inner)})"


def quantile(q, metric, by=HOP, extra=""):
    inner = lambda s: f"sum by (le, {by}) (rate({metric}_bucket{s}[{RI}]))"
    body = either_extra(inner, extra) if extra else either(inner)
    return f"histogram_quantile({q}, {body})"


def node_sel(extra=""):
    return '{node=~"$node"' + (", " + extra if extra else "") + "}"


class Board:
    def __init__(self, uid, title, description):
        self.uid, self.title, self.description = uid, title, description
        self.panels = []
        self.y = 0
        self.x = 0

    def panel(self, title, unit, targets, kind="timeseries", description="", width=12, height=8, **extra):
        if self.x + width > 24:
            self.x = 0
            self.y += height
        p = {
            "id": len(self.panels) + 1,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": DS,
            "gridPos": {"h": height, "w": width, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [
                {
                    "datasource": DS,
                    "refId": chr(ord("A") + i),
                    "expr": expr,
                    "legendFormat": legend,
                    **({"instant": True, "range": False, "format": "table"} if kind in ("table", "bargauge") else {}),
                }
                for i, (expr, legend) in enumerate(targets)
            ],
            "options": {},
        }
        if kind == "timeseries":
            p["fieldConfig"]["defaults"]["custom"] = {"drawStyle": "line", "fillOpacity": 10, "showPoints": "never"}
            p["options"] = {"legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull", "max"]},
                            "tooltip": {"mode": "multi", "sort": "desc"}}
        if kind == "bargauge":
            p["options"] = {"displayMode": "gradient", "orientation": "horizontal", "showUnfilled": True,
                            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": True}}
        p.update(extra)
        self.panels.append(p)
        self.x += width
        return p

    def row_break(self):
        if self.x:
            self.x = 0
            self.y += 8

    def json(self):
        hop_metrics = '{__name__=~"hopwatch_hop_(requests|connections_opened|drops)_total"}'
        var = lambda name, label, query, refresh=2: {
            "name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": f"{name}-var"}, "definition": query,
            "refresh": refresh, "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "sort": 1,
        }
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["hopwatch"],
            "schemaVersion": 39,
            "version": 1,
            "editable": True,
            "graphTooltip": 1,
            "time": {"from": "now-1h", "to": "now"},
            "refresh": "30s",
            "timezone": "",
            "links": [{"title": "hopwatch", "type": "dashboards", "tags": ["hopwatch"], "asDropdown": True}],
            "annotations": {"list": []},
            "templating": {"list": [
                {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
                 "current": {}, "hide": 0},
                var("node", "Node", "label_values(hopwatch_agent_info, node)"),
                var("namespace", "Namespace",
                    f'label_values({hop_metrics[:-1]}, node=~"$node"}}, destination_namespace)'),
                var("workload", "Workload",
                    f'label_values({hop_metrics[:-1]}, node=~"$node", destination_namespace=~"$namespace"}}, destination_workload)'),
            ]},
            "panels": self.panels,
        }


def hop_latency():
    b = Board("hopwatch-hop-latency", "hopwatch / Hop latency",
              "Per hop (client workload → server workload:port): request rate, errors, latency quantiles "
              "as each end measured them, TCP connect time, open connections and throughput.")
    req = "hopwatch_hop_requests_total"
    err = "hopwatch_hop_request_errors_total"
    dur = "hopwatch_hop_request_duration_seconds"
    b.panel("Request rate by hop", "reqps", [(hop_rate(req, HOP + ", protocol"), HOP_LEGEND + " {{protocol}}")],
            description="Application exchanges per second (the larger of the client's and the server's count).")
    b.panel("Error ratio by hop", "percentunit",
            [(f"{hop_rate(err, HOP + ', protocol')} / {hop_rate(req, HOP + ', protocol')}", HOP_LEGEND + " {{protocol}}")],
            description="Failed exchanges (error status or reply, no response) over all exchanges.")
    b.panel("p50 latency by hop (client side)", "s",
            [(quantile(0.5, dur, HOP + ", protocol", CLIENT), HOP_LEGEND)],
            description="Median request → response time measured at the client's socket (network included).")
    b.panel("p99 latency by hop (client side)", "s",
            [(quantile(0.99, dur, HOP + ", protocol", CLIENT), HOP_LEGEND)],
            description="99th percentile request → response time at the client's socket.")
    b.panel("p99 latency by hop (server side)", "s",
            [(quantile(0.99, dur, HOP + ", protocol", SERVER), HOP_LEGEND)],
            description="99th percentile time the server took (request read → response written); the "
                        "difference to the client side is network and queueing.")
    b.panel("Top slow hops (p99, client side)", "s",
            [(f"topk(10, {quantile(0.99, dur, HOP + ', protocol', CLIENT)})", HOP_LEGEND)],
            kind="bargauge", description="The ten hops with the highest p99 latency now.")
    b.panel("TCP connect p99 by hop", "s", [(quantile(0.99, "hopwatch_hop_connect_duration_seconds"), HOP_LEGEND)],
            description="99th percentile TCP handshake time (SYN sent → established) at the client.")
    b.panel("Top slow connects (p99)", "s",
            [(f"topk(10, {quantile(0.99, 'hopwatch_hop_connect_duration_seconds')})", HOP_LEGEND)],
            kind="bargauge", description="The ten hops with the slowest TCP handshakes now.")
    tls = "hopwatch_hop_tls_handshake_duration_seconds"
    b.panel("TLS handshake p99 by hop", "s",
            [(quantile(0.99, tls, HOP + ", reporter"), HOP_LEGEND + " ({{reporter}})")],
            description="99th percentile TLS handshake time (ClientHello → the client's first encrypted "
                        "record), as each end measured it from its own socket: a distant client shows "
                        "its round trips here, a server short of CPU its crypto.")
    b.panel("TLS handshake failures by hop", "short",
            [(hop_rate("hopwatch_hop_tls_handshake_failures_total", HOP + ", reason"),
              HOP_LEGEND + " {{reason}}")],
            description="Failed TLS handshakes per second by reason: the alert's description "
                        "(protocol_version, handshake_failure, ...) or a reset or close mid-handshake.")
    b.panel("Open connections by hop", "short",
            [(f"max by ({HOP}) ({either(lambda s: f'sum by ({HOP}, reporter) (hopwatch_hop_open_connections{s})')})",
              HOP_LEGEND)],
            description="TCP connections open now.")
    b.panel("Throughput by hop (client → server)", "Bps",
            [(f"max by ({HOP}) ({either_extra(lambda s: f'sum by ({HOP}) (rate(hopwatch_hop_sent_bytes_total{s}[{RI}]))', CLIENT)}"
              f" or {either_extra(lambda s: f'sum by ({HOP}) (rate(hopwatch_hop_received_bytes_total{s}[{RI}]))', SERVER)})",
              HOP_LEGEND)],
            description="Payload bytes per second from client to server.")
    return b


def drops_tcp():
    b = Board("hopwatch-drops-tcp", "hopwatch / Drops and TCP health",
              "Packets the kernel dropped (by reason, location and hop), retransmits, resets and failed connects.")
    b.panel("Drops by reason", "pps",
            [(f"sum by (reason) (rate(hopwatch_kernel_drops_total{node_sel()}[{RI}]))", "{{reason}}")],
            description="Packets dropped by the kernel on this node, by its drop reason.")
    b.panel("Drops by reason and location", "pps",
            [(f"topk(20, sum by (reason, location) (rate(hopwatch_kernel_drops_total{node_sel()}[{RI}])))",
              "{{reason}} at {{location}}")],
            description="Where in the kernel packets are dropped (function+offset), for the 20 busiest.")
    b.panel("Drops by hop and reason", "pps",
            [(f"sum by ({HOP}, reason) ({either(lambda s: f'rate(hopwatch_hop_drops_total{s}[{RI}])')})",
              HOP_LEGEND + " {{reason}}")],
            description="Dropped packets of each hop (replies are counted on the hop they answer).")
    b.panel("Retransmits by hop", "cps",
            [(f"sum by ({HOP}) ({either(lambda s: f'rate(hopwatch_hop_retransmits_total{s}[{RI}])')})", HOP_LEGEND)],
            description="TCP segments retransmitted per second (both ends' retransmits: each counts its own direction).")
    b.panel("Resets by hop", "cps", [(hop_rate("hopwatch_hop_resets_total"), HOP_LEGEND)],
            description="TCP resets per second on the hop.")
    b.panel("Failed connects by cause", "cps",
            [(f"sum by (cause) ({either(lambda s: f'rate(hopwatch_hop_connect_failures_total{s}[{RI}])')})", "{{cause}}")],
            description="TCP connects that failed, by errno (ECONNREFUSED: nothing listening; ETIMEDOUT: no answer).")
    b.panel("Failed connects by hop", "cps",
            [(f"sum by ({HOP}, cause) ({either(lambda s: f'rate(hopwatch_hop_connect_failures_total{s}[{RI}])')})",
              HOP_LEGEND + " {{cause}}")],
            description="Failed connects per hop and cause.")
    b.panel("Connections opened by hop", "cps", [(hop_rate("hopwatch_hop_connections_opened_total"), HOP_LEGEND)],
            description="New TCP connections per second (connection churn).")
    return b


def dns():
    b = Board("hopwatch-dns", "hopwatch / DNS",
              "DNS queries seen on the wire: rate, latency, response codes, failures and NXDOMAIN names.")
    q = "hopwatch_dns_queries_total"
    by_server = "destination_namespace, destination_workload"
    b.panel("DNS queries by server", "reqps",
            [(f"max by ({by_server}) ({either(lambda s: f'sum by ({by_server}, reporter) (rate({q}{s}[{RI}]))')})",
              "{{destination_namespace}}/{{destination_workload}}")],
            description="DNS queries per second to each DNS server.")
    for p in ("0.5", "0.99"):
        b.panel(f"DNS latency p{int(float(p) * 100)} by client", "s",
                [(quantile(p, "hopwatch_hop_request_duration_seconds", "source_namespace, source_workload",
                           'protocol="dns", reporter="client"'),
                  "{{source_namespace}}/{{source_workload}}")],
                description="Query → answer time measured at the asking socket.")
    b.panel("DNS responses by rcode", "reqps",
            [(f"max by (rcode) ({either(lambda s: f'sum by (rcode, reporter) (rate({q}{s}[{RI}]))')})", "{{rcode}}")],
            description="Answers per second by response code (TIMEOUT: no answer).")
    fail = 'rcode=~"SERVFAIL|REFUSED|FORMERR|NOTIMP|TIMEOUT|OTHER"'
    by_client = "source_namespace, source_workload"
    b.panel("DNS failure ratio by client", "percentunit",
            [(f"(max by ({by_client}) ({either_extra(lambda s: f'sum by ({by_client}, reporter) (rate({q}{s}[{RI}]))', fail)}) or "
              f"0 * max by ({by_client}) ({either(lambda s: f'sum by ({by_client}, reporter) (rate({q}{s}[{RI}]))')}))"
              f" / max by ({by_client}) ({either(lambda s: f'sum by ({by_client}, reporter) (rate({q}{s}[{RI}]))')})",
              "{{source_namespace}}/{{source_workload}}")],
            description="Queries that failed (SERVFAIL, REFUSED, no answer, ...) over all queries; NXDOMAIN is not "
                        "counted as a failure (Kubernetes search domains make it routine).")
    b.panel("NXDOMAIN names", "short",
            [(f"topk(20, max by (query, source_workload) ({either(lambda s: f'sum by (query, source_workload, reporter) (increase(hopwatch_dns_nxdomain_responses_total{s}[$__range]))')}))",
              "{{query}} ({{source_workload}})")],
            kind="table", description="Names that did not exist, with who asked, over the dashboard's time range.")
    b.panel("NXDOMAIN rate by client", "reqps",
            [(f"max by ({by_client}) ({either_extra(lambda s: f'sum by ({by_client}, reporter) (rate({q}{s}[{RI}]))', NXDOMAIN)})",
              "{{source_namespace}}/{{source_workload}}")],
            description="NXDOMAIN answers per second by asking workload.")
    return b


def agent_health():
    b = Board("hopwatch-agent-health", "hopwatch / Agent health",
              "The agent itself: events lost and where, CPU and memory, kernel map and ring buffer use, "
              "program activity, parse failures, export lag.")
    agent = 'on (instance) group_left () hopwatch_agent_info{node=~"$node"}'
    b.panel("Lost events by source", "cps",
            [(f"sum by (node, source) (rate(hopwatch_lost_events_total{node_sel()}[{RI}]))", "{{node}} {{source}}")],
            description="Events the agent could not keep (kernel ring buffer full, output queue full). Should be 0.")
    b.panel("Queue drops", "cps",
            [(f"sum by (node, queue) (rate(hopwatch_queue_dropped_events_total{node_sel()}[{RI}]))", "{{node}} {{queue}}")],
            description="Events dropped because a queue inside the agent was full.")
    b.panel("Agent CPU", "percentunit",
            [(f"rate(process_cpu_seconds_total{node_sel()}[{RI}]) * {agent}", "{{node}}")],
            description="CPU time of the agent process (1 = one full core).")
    b.panel("Agent memory (resident)", "bytes",
            [(f"process_resident_memory_bytes{node_sel()} * {agent}", "{{node}}")],
            description="Resident memory of the agent process.")
    b.panel("Map usage", "percentunit",
            [(f"hopwatch_map_entries{node_sel()} / hopwatch_map_capacity_entries{node_sel()}", "{{node}} {{map}}")],
            description="Entries over capacity of the kernel maps (upper case) and the agent's tables.")
    b.panel("Ring buffer fill (peak)", "percentunit",
            [(f"hopwatch_ringbuf_used_peak_bytes{node_sel()} / hopwatch_ringbuf_size_bytes{node_sel()}", "{{node}}")],
            description="Highest fill of the kernel → agent ring buffer over the last seconds; near 1 means events are about to be lost.")
    b.panel("Flows by type", "cps",
            [(f"sum by (node, type) (rate(hopwatch_flows_total{node_sel()}[{RI}]))", "{{node}} {{type}}")],
            description="Flows the agent produced per second.")
    b.panel("Export lag p99", "s",
            [(f"histogram_quantile(0.99, sum by (le, node) (rate(hopwatch_export_lag_seconds_bucket{node_sel()}[{RI}])))", "{{node}}")],
            description="Time from the kernel event to the flow being counted.")
    b.panel("Kernel program activity", "cps",
            [(f"sum by (node, event) (rate(hopwatch_kernel_events_total{node_sel(ACTIVITY)}[{RI}]))",
              "{{node}} {{event}}")],
            description="Runs of the kernel hooks per second, from hopwatch's own counters.")
    b.panel("Kernel errors and skipped events", "cps",
            [(f"sum by (node, event) (rate(hopwatch_kernel_events_total{node_sel(KERNEL_ERRORS)}[{RI}]))",
              "{{node}} {{event}}")],
            description="What the kernel programs could not do or chose to skip.")
    b.panel("Parse failures", "cps",
            [(f"sum by (node, stage) (rate(hopwatch_parse_failures_total{node_sel()}[{RI}]))", "{{node}} {{stage}}")],
            description="Inputs the agent could not decode or parse.")
    b.panel("Connections not tracked (tables full)", "cps",
            [(f"sum by (node, table) (rate(hopwatch_table_full_total{node_sel()}[{RI}]))", "{{node}} {{table}}")],
            description="Connections or L7 sessions the agent did not track because its table was full (still reported at L4).")
    b.panel("Hop table overflow and evictions", "cps",
            [(f"sum by (node, event) (rate(hopwatch_hop_state_events_total{node_sel()}[{RI}]))", "{{node}} {{event}}")],
            description="Observations counted in the _overflow_ hop (series limit reached) and hops evicted as stale.")
    b.panel("Kernel program CPU (with --bpf-stats)", "percentunit",
            [(f"sum by (node, program) (rate(hopwatch_program_run_seconds_total{node_sel()}[{RI}]))", "{{node}} {{program}}")],
            description="CPU time spent in each kernel program (only counted while the agent runs with --bpf-stats).")
    return b


def main():
    out = pathlib.Path(__file__).resolve().parent
    for name, board in [("hop-latency", hop_latency()), ("drops-tcp", drops_tcp()), ("dns", dns()),
                        ("agent-health", agent_health())]:
        (out / f"{name}.json").write_text(json.dumps(board.json(), indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
