//! A small reader for the kernel's BTF (`/sys/kernel/btf/vmlinux`): just enough to find struct
//! member offsets and enum value names at run time, so no kernel layout is compiled into hopwatch.
//!
//! Format: <https://docs.kernel.org/bpf/btf.html>. Type ids start at 1; anonymous struct/union
//! members are searched through, as C lets code name their fields directly.

use std::{collections::HashMap, path::Path};

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read BTF from {path}: {source} (is CONFIG_DEBUG_INFO_BTF enabled?)")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("BTF kind {kind} at type id {id} is not known to hopwatch")]
    UnknownKind { kind: u32, id: u32 },
    #[error("this kernel's BTF has no struct {0}")]
    NoStruct(String),
    #[error("this kernel's BTF has no member {member} in struct {strukt}")]
    NoMember { strukt: String, member: String },
    #[error("this kernel's BTF has no enum {0}")]
    NoEnum(String),
}

#[derive(Debug, Clone)]
struct Member {
    name: u32,
    type_id: u32,
    bit_offset: u32,
    bitfield_size: u32,
}

#[derive(Debug, Clone)]
enum Type {
    /// INT / FLOAT: byte size.
    Scalar {
        size: u32,
    },
    Ptr,
    Array {
        elem: u32,
        len: u32,
    },
    /// STRUCT / UNION.
    Composite {
        name: u32,
        size: u32,
        members: Vec<Member>,
    },
    Enum {
        name: u32,
        size: u32,
        values: Vec<(u32, i64)>,
    },
    /// TYPEDEF / VOLATILE / CONST / RESTRICT / `TYPE_TAG`: an alias of another type.
    Alias {
        target: u32,
    },
    /// Everything we never need to look inside.
    Other,
}

/// A resolved struct member: where it is and how big it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// Byte offset from the start of the outermost struct.
    pub offset: u32,
    /// Byte size of the member's type.
    pub size: u32,
    /// Non-zero for bitfields.
    pub bitfield_bits: u32,
}

/// Parsed BTF.
pub struct Btf {
    strings: Vec<u8>,
    /// Index 0 is the implicit `void`.
    types: Vec<Type>,
    structs_by_name: HashMap<String, u32>,
    enums_by_name: HashMap<String, u32>,
}

impl Btf {
    pub const VMLINUX: &'static str = "/sys/kernel/btf/vmlinux";

    /// Reads and parses a BTF file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, BtfError> {
        let path = path.as_ref();
        let data = std::fs::read(path)
            .map_err(|source| BtfError::Read { path: path.display().to_string(), source })?;
        Self::parse(&data)
    }

    /// Parses raw BTF bytes (little-endian, as on the machines hopwatch runs on).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let u16_at = |off: usize| -> Result<u16, BtfError> {
            data.get(off..off + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .ok_or(BtfError::Malformed("truncated header"))
        };
        let u32_at = |off: usize| -> Result<u32, BtfError> {
            data.get(off..off + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or(BtfError::Malformed("truncated header"))
        };
        if u16_at(0)? != MAGIC {
            return Err(BtfError::Malformed("bad magic (big-endian or not BTF)"));
        }
        let hdr_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let section = |off: usize, len: usize| {
            data.get(hdr_len + off..hdr_len + off + len)
                .ok_or(BtfError::Malformed("section out of bounds"))
        };
        let type_data = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?.to_vec();

        let mut types = vec![Type::Other];
        let mut r = Reader { data: type_data, pos: 0 };
        while r.pos < type_data.len() {
            let id =
                u32::try_from(types.len()).map_err(|_| BtfError::Malformed("too many types"))?;
            types.push(parse_type(&mut r, id)?);
        }
        let mut btf =
            Btf { strings, types, structs_by_name: HashMap::new(), enums_by_name: HashMap::new() };
        for (id, ty) in (0u32..).zip(btf.types.iter()) {
            match ty {
                Type::Composite { name, .. } if *name != 0 => {
                    let name = btf.str_at(*name).to_owned();
                    btf.structs_by_name.entry(name).or_insert(id);
                }
                Type::Enum { name, .. } if *name != 0 => {
                    let name = btf.str_at(*name).to_owned();
                    btf.enums_by_name.entry(name).or_insert(id);
                }
                _ => {}
            }
        }
        Ok(btf)
    }

    fn str_at(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// Follows aliases (typedef, const, volatile, ...) to the underlying type.
    fn resolve(&self, mut id: u32) -> (u32, &Type) {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(Type::Alias { target }) => id = *target,
                Some(t) => return (id, t),
                None => break,
            }
        }
        (0, &Type::Other)
    }

    fn size_of(&self, id: u32) -> u32 {
        match self.resolve(id).1 {
            Type::Scalar { size } | Type::Composite { size, .. } | Type::Enum { size, .. } => *size,
            Type::Ptr => 8,
            Type::Array { elem, len } => self.size_of(*elem) * len,
            Type::Alias { .. } | Type::Other => 0,
        }
    }

    /// Finds `name` among the members of composite type `id`, looking inside anonymous members.
    /// Returns the member's bit offset from the start of `id` and the member.
    fn find_member(&self, id: u32, name: &str, depth: u32) -> Option<(u32, Member)> {
        if depth > 8 {
            return None;
        }
        let Type::Composite { members, .. } = self.resolve(id).1 else {
            return None;
        };
        for m in members {
            if m.name != 0 && self.str_at(m.name) == name {
                return Some((m.bit_offset, m.clone()));
            }
        }
        for m in members.iter().filter(|m| m.name == 0) {
            if let Some((off, found)) = self.find_member(m.type_id, name, depth + 1) {
                return Some((m.bit_offset + off, found));
            }
        }
        None
    }

    /// Resolves `path` (e.g. `["__sk_common", "skc_net", "net"]`) inside struct `strukt`.
    pub fn field(&self, strukt: &str, path: &[&str]) -> Result<Field, BtfError> {
        let mut id = *self
            .structs_by_name
            .get(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        let mut bits = 0;
        let mut last = None;
        for part in path {
            let (off, m) = self.find_member(id, part, 0).ok_or_else(|| BtfError::NoMember {
                strukt: strukt.to_owned(),
                member: path.join("."),
            })?;
            bits += off;
            id = m.type_id;
            last = Some(m);
        }
        let m = last.ok_or(BtfError::Malformed("empty member path"))?;
        Ok(Field {
            offset: bits / 8,
            size: self.size_of(m.type_id),
            bitfield_bits: m.bitfield_size,
        })
    }

    /// Whether any type in this BTF is called `name` (e.g. `btf_trace_sock_send_length`, the
    /// typedef a kernel has for each of its BTF tracepoints).
    #[must_use]
    pub fn has_name(&self, name: &str) -> bool {
        self.strings.split(|&b| b == 0).any(|s| s == name.as_bytes())
    }

    /// Values of enum `name` as `(value, name)`.
    pub fn enum_values(&self, name: &str) -> Result<Vec<(i64, String)>, BtfError> {
        let id = *self.enums_by_name.get(name).ok_or_else(|| BtfError::NoEnum(name.to_owned()))?;
        let Type::Enum { values, .. } = &self.types[id as usize] else {
            return Err(BtfError::NoEnum(name.to_owned()));
        };
        Ok(values.iter().map(|(n, v)| (*v, self.str_at(*n).to_owned())).collect())
    }
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn u32(&mut self) -> Result<u32, BtfError> {
        let b = self
            .data
            .get(self.pos..self.pos + 4)
            .ok_or(BtfError::Malformed("truncated type section"))?;
        self.pos += 4;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn skip(&mut self, words: usize) -> Result<(), BtfError> {
        for _ in 0..words {
            self.u32()?;
        }
        Ok(())
    }
}

fn parse_type(r: &mut Reader<'_>, id: u32) -> Result<Type, BtfError> {
    let name = r.u32()?;
    let info = r.u32()?;
    let size_or_type = r.u32()?;
    let vlen = (info & 0xffff) as usize;
    let kind = (info >> 24) & 0x1f;
    let kind_flag = info >> 31 == 1;
    Ok(match kind {
        KIND_INT => {
            r.skip(1)?;
            Type::Scalar { size: size_or_type }
        }
        KIND_FLOAT => Type::Scalar { size: size_or_type },
        KIND_PTR => Type::Ptr,
        KIND_ARRAY => {
            let elem = r.u32()?;
            let _index = r.u32()?;
            let len = r.u32()?;
            Type::Array { elem, len }
        }
        KIND_STRUCT | KIND_UNION => {
            let mut members = Vec::with_capacity(vlen);
            for _ in 0..vlen {
                let name = r.u32()?;
                let type_id = r.u32()?;
                let off = r.u32()?;
                let (bit_offset, bitfield_size) =
                    if kind_flag { (off & 0x00ff_ffff, off >> 24) } else { (off, 0) };
                members.push(Member { name, type_id, bit_offset, bitfield_size });
            }
            Type::Composite { name, size: size_or_type, members }
        }
        KIND_ENUM => {
            let mut values = Vec::with_capacity(vlen);
            for _ in 0..vlen {
                let n = r.u32()?;
                let v = r.u32()?;
                let v = if kind_flag { i64::from(v.cast_signed()) } else { i64::from(v) };
                values.push((n, v));
            }
            Type::Enum { name, size: size_or_type, values }
        }
        KIND_ENUM64 => {
            let mut values = Vec::with_capacity(vlen);
            for _ in 0..vlen {
                let n = r.u32()?;
                let lo = u64::from(r.u32()?);
                let hi = u64::from(r.u32()?);
                values.push((n, ((hi << 32) | lo).cast_signed()));
            }
            Type::Enum { name, size: size_or_type, values }
        }
        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
            Type::Alias { target: size_or_type }
        }
        KIND_FWD | KIND_FUNC => Type::Other,
        KIND_FUNC_PROTO => {
            r.skip(2 * vlen)?;
            Type::Other
        }
        KIND_VAR | KIND_DECL_TAG => {
            r.skip(1)?;
            Type::Other
        }
        KIND_DATASEC => {
            r.skip(3 * vlen)?;
            Type::Other
        }
        kind => return Err(BtfError::UnknownKind { kind, id }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob from raw type words and a string table.
    fn blob(types: &[u32], strings: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        let type_len = u32::try_from(types.len() * 4).unwrap();
        for v in [24, 0, type_len, type_len, u32::try_from(strings.len()).unwrap()] {
            out.extend_from_slice(&u32::to_le_bytes(v));
        }
        for t in types {
            out.extend_from_slice(&t.to_le_bytes());
        }
        out.extend_from_slice(strings);
        out
    }

    const fn info(kind: u32, vlen: u32, kind_flag: bool) -> u32 {
        (kind << 24) | vlen | if kind_flag { 1 << 31 } else { 0 }
    }

    #[test]
    fn finds_members_through_anonymous_unions_and_typedefs() {
        // strings: 0:"" 1:"int" 5:"outer" 11:"a" 13:"b" 15:"inner_t" 23:"c" 25:"reason" 32:"X"
        let strings = b"\0int\0outer\0a\0b\0inner_t\0c\0reason\0X\0";
        let types = [
            // 1: int (4 bytes)
            1,
            info(KIND_INT, 0, false),
            4,
            32,
            // 2: anonymous union { int b; } size 4
            0,
            info(KIND_UNION, 1, false),
            4,
            13,
            1,
            0,
            // 3: struct outer { int a; union { int b; }; inner_t c; } size 12
            5,
            info(KIND_STRUCT, 3, false),
            12,
            11,
            1,
            0,
            0,
            2,
            32,
            23,
            4,
            64,
            // 4: typedef inner_t → int
            15,
            info(KIND_TYPEDEF, 0, false),
            1,
            // 5: enum reason { X = 7 }
            25,
            info(KIND_ENUM, 1, false),
            4,
            32,
            7,
        ];
        let btf = Btf::parse(&blob(&types, strings)).expect("parses");
        assert_eq!(
            btf.field("outer", &["a"]).unwrap(),
            Field { offset: 0, size: 4, bitfield_bits: 0 }
        );
        assert_eq!(btf.field("outer", &["b"]).unwrap().offset, 4);
        assert_eq!(
            btf.field("outer", &["c"]).unwrap(),
            Field { offset: 8, size: 4, bitfield_bits: 0 }
        );
        assert!(matches!(btf.field("outer", &["zz"]), Err(BtfError::NoMember { .. })));
        assert!(matches!(btf.field("nope", &["a"]), Err(BtfError::NoStruct(_))));
        assert_eq!(btf.enum_values("reason").unwrap(), vec![(7, "X".to_owned())]);
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(Btf::parse(b"not btf at all, no"), Err(BtfError::Malformed(_))));
        assert!(Btf::parse(&[]).is_err());
        let mut truncated = blob(&[1, info(KIND_INT, 0, false), 4], b"\0");
        truncated.truncate(30);
        assert!(Btf::parse(&truncated).is_err());
    }

    #[test]
    fn a_missing_file_names_the_path_and_the_kernel_option() {
        let err = Btf::from_file("/nonexistent/vmlinux").err().expect("no such file").to_string();
        assert!(
            err.contains("/nonexistent/vmlinux") && err.contains("CONFIG_DEBUG_INFO_BTF"),
            "{err}"
        );
    }

    #[test]
    fn reads_this_kernels_vmlinux() {
        let btf = Btf::from_file(Btf::VMLINUX)
            .expect("/sys/kernel/btf/vmlinux must be readable (CONFIG_DEBUG_INFO_BTF)");
        let net = btf.field("sock", &["__sk_common", "skc_net", "net"]).expect("sock.skc_net");
        assert_eq!(net.size, 8);
        let dport = btf.field("sock", &["__sk_common", "skc_dport"]).expect("skc_dport");
        assert_eq!(dport.size, 2);
        let reasons = btf.enum_values("skb_drop_reason").expect("enum skb_drop_reason");
        assert!(reasons.iter().any(|(_, n)| n == "SKB_DROP_REASON_NETFILTER_DROP"));
    }
}
