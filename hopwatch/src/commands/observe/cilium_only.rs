//! `hubble observe` flags hopwatch refuses, each with the reason (exit 2).

use super::filters::FlagError;

/// `hubble observe` flags that have no meaning without Cilium, or that hopwatch refuses: they
/// are accepted by the parser (hidden from --help) so that the user hears why, with exit 2.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct CiliumOnly {
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    identity: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    from_identity: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    to_identity: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    cluster: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    from_cluster: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    to_cluster: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    encrypted: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    unencrypted: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    snat_ip: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    ip_trace_id: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    ip_translation: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    print_policy_names: Option<String>,
    #[arg(short = 'P', long, hide = true, num_args = 0..=1, default_missing_value = "")]
    port_forward: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    port_forward_port: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    kube_context: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    kubeconfig: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    kube_namespace: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    tls_allow_insecure: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    basic_auth_username: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    basic_auth_password: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    request_timeout: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    config: Option<String>,
    #[arg(short = 'D', long, hide = true, num_args = 0..=1, default_missing_value = "")]
    debug: Option<String>,
}

const NO_CILIUM_IDENTITY: &str = "hopwatch has no Cilium security identities; select endpoints \
    with --label, --pod or --workload";
const NO_CLUSTER: &str =
    "hopwatch flows carry no Cilium cluster name; one collector serves one cluster";
const NO_ENCRYPTION_FLAG: &str = "hopwatch does not see Cilium's WireGuard/IPsec datapath; \
    L7 flows decrypted from TLS libraries say so in l7.tls";
const PORT_FORWARD: &str = "hopwatch does not port-forward to a hubble-relay pod; point --server \
    at the collector (kubectl port-forward svc/hopwatch-collector 4245 if needed)";

impl CiliumOnly {
    /// The first refused flag given, with why.
    pub(super) fn check(&self) -> Result<(), FlagError> {
        let refusals: [(bool, &'static str, &'static str); 23] = [
            (self.identity.is_some(), "identity", NO_CILIUM_IDENTITY),
            (self.from_identity.is_some(), "from-identity", NO_CILIUM_IDENTITY),
            (self.to_identity.is_some(), "to-identity", NO_CILIUM_IDENTITY),
            (self.cluster.is_some(), "cluster", NO_CLUSTER),
            (self.from_cluster.is_some(), "from-cluster", NO_CLUSTER),
            (self.to_cluster.is_some(), "to-cluster", NO_CLUSTER),
            (self.encrypted.is_some(), "encrypted", NO_ENCRYPTION_FLAG),
            (self.unencrypted.is_some(), "unencrypted", NO_ENCRYPTION_FLAG),
            (
                self.snat_ip.is_some(),
                "snat-ip",
                "hopwatch records no SNAT address (it records the DNAT target of a Service \
                 connection as translated_destination)",
            ),
            (
                self.ip_trace_id.is_some(),
                "ip-trace-id",
                "IP trace ids are a Cilium datapath IP option that hopwatch does not read; \
                 --trace-id selects W3C trace ids",
            ),
            (
                self.ip_translation.is_some(),
                "ip-translation",
                "hopwatch always prints the pod name it knows for an address; --numeric prints \
                 addresses instead",
            ),
            (
                self.print_policy_names.is_some(),
                "print-policy-names",
                "hopwatch flows carry no Cilium network policy verdicts",
            ),
            (self.port_forward.is_some(), "port-forward", PORT_FORWARD),
            (self.port_forward_port.is_some(), "port-forward-port", PORT_FORWARD),
            (self.kube_context.is_some(), "kube-context", PORT_FORWARD),
            (self.kubeconfig.is_some(), "kubeconfig", PORT_FORWARD),
            (self.kube_namespace.is_some(), "kube-namespace", PORT_FORWARD),
            (
                self.tls_allow_insecure.is_some(),
                "tls-allow-insecure",
                "hopwatch always verifies the collector's certificate; pass its CA with \
                 --tls-ca-cert-files",
            ),
            (
                self.basic_auth_username.is_some(),
                "basic-auth-username",
                "the collector authenticates clients with mutual TLS (--tls-client-cert-file), \
                 not passwords",
            ),
            (
                self.basic_auth_password.is_some(),
                "basic-auth-password",
                "the collector authenticates clients with mutual TLS (--tls-client-cert-file), \
                 not passwords",
            ),
            (
                self.request_timeout.is_some(),
                "request-timeout",
                "observe makes only the streaming GetFlows call, which Hubble's \
                 --request-timeout does not cover either; --timeout bounds connecting",
            ),
            (
                self.config.is_some(),
                "config",
                "hopwatch reads no hubble config file; use flags or HOPWATCH_SERVER",
            ),
            (self.debug.is_some(), "debug", "hopwatch observe has no debug output"),
        ];
        match refusals.iter().find(|(given, ..)| *given) {
            Some(&(_, flag, reason)) => Err(FlagError::Unsupported { flag, reason }),
            None => Ok(()),
        }
    }
}
