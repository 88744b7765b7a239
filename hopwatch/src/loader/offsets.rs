//! Computes [`KernelOffsets`] from this kernel's BTF.

use hopwatch_common::KernelOffsets;

use super::btf::{Btf, BtfError};

/// Every field the programs read, resolved in BTF. A field the programs need but this kernel lacks
/// is an error: reads at a guessed offset would return garbage.
pub(crate) fn compute(btf: &Btf) -> Result<KernelOffsets, BtfError> {
    let off = |strukt: &str, path: &[&str]| -> Result<u16, BtfError> {
        let f = btf.field(strukt, path)?;
        u16::try_from(f.offset).map_err(|_| BtfError::Malformed("field offset above 64 KiB"))
    };
    let sk = |path: &[&str]| off("sock", path);
    let skc = |field: &str| off("sock", &["__sk_common", field]);
    let protocol = btf.field("sock", &["sk_protocol"])?;
    if protocol.bitfield_bits != 0 && protocol.bitfield_bits != 8 {
        // Before 5.6 sk_protocol was an 8-bit bitfield on a byte boundary; anything else we do not
        // know how to read.
        return Err(BtfError::Malformed("sock.sk_protocol is a bitfield of unexpected width"));
    }
    Ok(KernelOffsets {
        sk_daddr: skc("skc_daddr")?,
        sk_rcv_saddr: skc("skc_rcv_saddr")?,
        sk_dport: skc("skc_dport")?,
        sk_num: skc("skc_num")?,
        sk_family: skc("skc_family")?,
        sk_net: sk(&["__sk_common", "skc_net", "net"])?,
        // IPv6 fields are absent on kernels built without CONFIG_IPV6.
        sk_v6_daddr: skc("skc_v6_daddr").unwrap_or(u16::MAX),
        sk_v6_rcv_saddr: skc("skc_v6_rcv_saddr").unwrap_or(u16::MAX),
        sk_protocol: u16::try_from(protocol.offset).unwrap_or(u16::MAX),
        sk_protocol_size: if protocol.bitfield_bits == 8 {
            1
        } else {
            u16::try_from(protocol.size).unwrap_or(0)
        },
        sk_err: sk(&["sk_err"])?,
        net_inum: off("net", &["ns", "inum"])?,
        skb_head: off("sk_buff", &["head"])?,
        skb_network_header: off("sk_buff", &["network_header"])?,
        skb_transport_header: off("sk_buff", &["transport_header"])?,
        skb_protocol: off("sk_buff", &["protocol"])?,
        skb_len: off("sk_buff", &["len"])?,
        skb_dev: off("sk_buff", &["dev"])?,
        skb_sk: off("sk_buff", &["sk"])?,
        dev_ifindex: off("net_device", &["ifindex"])?,
        dev_nd_net: off("net_device", &["nd_net", "net"])?,
        regs_di: off("pt_regs", &["di"])?,
        regs_si: off("pt_regs", &["si"])?,
        regs_dx: off("pt_regs", &["dx"])?,
        regs_r10: off("pt_regs", &["r10"])?,
        regs_r8: off("pt_regs", &["r8"])?,
        regs_orig_ax: off("pt_regs", &["orig_ax"])?,
        task_files: off("task_struct", &["files"])?,
        files_fdt: off("files_struct", &["fdt"])?,
        fdt_max_fds: off("fdtable", &["max_fds"])?,
        fdt_fd: off("fdtable", &["fd"])?,
        file_inode: off("file", &["f_inode"])?,
        file_private_data: off("file", &["private_data"])?,
        inode_mode: off("inode", &["i_mode"])?,
        socket_sk: off("socket", &["sk"])?,
        sk_cookie: skc("skc_cookie")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_every_field_on_this_kernel() {
        let btf = Btf::from_file(Btf::VMLINUX).expect("vmlinux BTF");
        let o = compute(&btf).expect("all offsets resolve");
        // Invariants that hold on every kernel since 4.x: sock_common is the first member of sock,
        // and the address fields sit in its first 16 bytes.
        assert!(o.sk_daddr < 16 && o.sk_rcv_saddr < 16, "{o:?}");
        assert!(o.sk_protocol_size == 1 || o.sk_protocol_size == 2);
        assert_ne!(o.sk_v6_daddr, u16::MAX, "this kernel has IPv6");
    }
}
