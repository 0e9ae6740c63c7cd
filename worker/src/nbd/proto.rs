//! NBD wire format: constants, encoders for what the client sends and decoders for what the server
//! sends. Pure functions over byte slices, so every parsing rule is unit-tested without a socket.
//!
//! Owns: magic numbers, option/command/reply codes and the validation of server messages that
//! needs no connection state. Must not: do I/O, know about timeouts, or know about qemu.

/// Values are from the NBD protocol document (doc/proto.md of the reference implementation).
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_BIT: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR_BIT | 1;

// Information types of NBD_REP_INFO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Structured reply flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT | 2;

// Error values carried in replies.
pub const EINVAL: u32 = 22;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Strings in the protocol "MUST be no longer than 4096 bytes".
pub const MAX_STRING: usize = 4096;
/// Largest option reply payload we accept; real ones are a few dozen bytes.
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Largest block status chunk we accept: the spec asks servers to stay under 2^20 descriptors.
pub const MAX_BLOCK_STATUS_CHUNK: u32 = 4 + 8 * (1 << 20);

/// Human name of an option, for error messages.
pub fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "an NBD option",
    }
}

/// Human name of an option error reply.
pub fn option_error_name(reply_type: u32) -> &'static str {
    match reply_type ^ REP_ERR_BIT {
        1 => "unsupported",
        2 => "forbidden by policy",
        3 => "invalid",
        4 => "not supported on this platform",
        5 => "TLS required",
        6 => "unknown export",
        7 => "server shutting down",
        8 => "block size negotiation required",
        9 => "too big",
        10 => "extended headers required",
        _ => "error",
    }
}

/// Human name of a command, for error messages.
pub fn command_name(command: u16) -> &'static str {
    match command {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_DISC => "disconnect",
        CMD_FLUSH => "flush",
        CMD_WRITE_ZEROES => "write-zeroes",
        CMD_BLOCK_STATUS => "block-status",
        _ => "command",
    }
}

/// Name of an NBD error value (they follow Linux errno numbering).
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        1 => "EPERM (operation not permitted)",
        5 => "EIO (input/output error)",
        12 => "ENOMEM (cannot allocate memory)",
        EINVAL => "EINVAL (invalid argument)",
        28 => "ENOSPC (no space left on device)",
        EOVERFLOW => "EOVERFLOW (value too large)",
        ENOTSUP => "ENOTSUP (operation not supported)",
        ESHUTDOWN => "ESHUTDOWN (server shutting down)",
        _ => "unknown error",
    }
}

pub fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// `IHAVEOPT, option, length, data`.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Data of NBD_OPT_GO: export name and the information we ask for (block size constraints,
/// which also promises the server that we honour them).
pub fn encode_go(export: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + export.len());
    out.extend_from_slice(&(export.len() as u32).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    out
}

/// Data of NBD_OPT_SET_META_CONTEXT: export name, number of queries, the queries.
pub fn encode_set_meta_context(export: &str, queries: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(export.len() as u32).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        out.extend_from_slice(&(q.len() as u32).to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
    out
}

/// Header of an option reply (20 bytes on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub len: u32,
}

pub fn parse_option_reply_header(
    b: &[u8; 20],
    sent_option: u32,
) -> Result<OptionReplyHeader, String> {
    let magic = be_u64(&b[0..8]);
    if magic != OPTION_REPLY_MAGIC {
        return Err(format!(
            "option reply has magic {magic:#x}, expected {OPTION_REPLY_MAGIC:#x}"
        ));
    }
    let header = OptionReplyHeader {
        option: be_u32(&b[8..12]),
        reply_type: be_u32(&b[12..16]),
        len: be_u32(&b[16..20]),
    };
    if header.option != sent_option {
        return Err(format!(
            "reply is for option {} but {} ({}) was sent",
            header.option,
            sent_option,
            option_name(sent_option)
        ));
    }
    if header.len > MAX_OPTION_REPLY {
        return Err(format!("option reply of {} bytes is too long", header.len));
    }
    Ok(header)
}

/// Export information from NBD_REP_INFO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info {
    Export {
        size: u64,
        flags: u16,
    },
    BlockSize {
        min: u32,
        preferred: u32,
        max: u32,
    },
    /// A type we did not ask for or do not know; the spec says to ignore it.
    Other(u16),
}

pub fn parse_info(payload: &[u8]) -> Result<Info, String> {
    if payload.len() < 2 {
        return Err(format!(
            "NBD_REP_INFO of {} bytes is too short",
            payload.len()
        ));
    }
    let info_type = be_u16(payload);
    match info_type {
        INFO_EXPORT => {
            if payload.len() != 12 {
                return Err(format!(
                    "NBD_INFO_EXPORT has {} bytes, expected 12",
                    payload.len()
                ));
            }
            Ok(Info::Export {
                size: be_u64(&payload[2..10]),
                flags: be_u16(&payload[10..12]),
            })
        }
        INFO_BLOCK_SIZE => {
            if payload.len() != 14 {
                return Err(format!(
                    "NBD_INFO_BLOCK_SIZE has {} bytes, expected 14",
                    payload.len()
                ));
            }
            let (min, preferred, max) = (
                be_u32(&payload[2..6]),
                be_u32(&payload[6..10]),
                be_u32(&payload[10..14]),
            );
            validate_block_sizes(min, preferred, max)?;
            Ok(Info::BlockSize {
                min,
                preferred,
                max,
            })
        }
        other => Ok(Info::Other(other)),
    }
}

/// The constraints of the "Size constraints" section that we rely on: a power-of-two minimum of
/// at most 64 KiB, and a maximum payload that is at least the minimum.
pub fn validate_block_sizes(min: u32, preferred: u32, max: u32) -> Result<(), String> {
    if !min.is_power_of_two() || min > 65536 {
        return Err(format!(
            "minimum block size {min} is not a power of two up to 65536"
        ));
    }
    if !preferred.is_power_of_two() || preferred < min {
        return Err(format!(
            "preferred block size {preferred} is not a power of two >= {min}"
        ));
    }
    if max < min {
        return Err(format!(
            "maximum payload {max} is smaller than the minimum block size {min}"
        ));
    }
    Ok(())
}

/// NBD_REP_META_CONTEXT payload: context id and name.
pub fn parse_meta_context(payload: &[u8]) -> Result<(u32, String), String> {
    if payload.len() < 5 || payload.len() > 4 + MAX_STRING {
        return Err(format!(
            "NBD_REP_META_CONTEXT of {} bytes is malformed",
            payload.len()
        ));
    }
    let id = be_u32(payload);
    let name = std::str::from_utf8(&payload[4..])
        .map_err(|_| "meta context name is not UTF-8".to_string())?;
    Ok((id, name.to_string()))
}

/// A transmission request header (28 bytes).
pub fn encode_request(flags: u16, command: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&command.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

/// The first 16 bytes of any reply, which is enough to tell simple from structured replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStart {
    Simple {
        error: u32,
        cookie: u64,
    },
    /// The 4-byte payload length follows on the wire.
    Structured {
        flags: u16,
        reply_type: u16,
        cookie: u64,
    },
}

pub fn parse_reply_start(b: &[u8; 16]) -> Result<ReplyStart, String> {
    let magic = be_u32(&b[0..4]);
    let cookie = be_u64(&b[8..16]);
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(ReplyStart::Simple {
            error: be_u32(&b[4..8]),
            cookie,
        }),
        STRUCTURED_REPLY_MAGIC => Ok(ReplyStart::Structured {
            flags: be_u16(&b[4..6]),
            reply_type: be_u16(&b[6..8]),
            cookie,
        }),
        EXTENDED_REPLY_MAGIC => Err("server sent an extended-header reply, which was not \
                                     negotiated"
            .to_string()),
        other => Err(format!("reply has unknown magic {other:#010x}")),
    }
}

/// An error chunk's payload: error value, message, and (for ERROR_OFFSET) the offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk {
    pub errno: u32,
    pub message: String,
    pub offset: Option<u64>,
}

pub fn parse_error_chunk(reply_type: u16, payload: &[u8]) -> Result<ErrorChunk, String> {
    if payload.len() < 6 {
        return Err(format!(
            "error chunk of {} bytes is too short",
            payload.len()
        ));
    }
    let errno = be_u32(payload);
    let msg_len = be_u16(&payload[4..6]) as usize;
    if 6 + msg_len > payload.len() {
        return Err(format!(
            "error chunk message of {msg_len} bytes does not fit in a {}-byte payload",
            payload.len()
        ));
    }
    let message = String::from_utf8_lossy(&payload[6..6 + msg_len]).into_owned();
    let rest = &payload[6 + msg_len..];
    let offset = if reply_type == REPLY_TYPE_ERROR_OFFSET {
        if rest.len() != 8 {
            return Err(format!(
                "NBD_REPLY_TYPE_ERROR_OFFSET has {} trailing bytes",
                rest.len()
            ));
        }
        Some(be_u64(rest))
    } else {
        None
    };
    if errno == 0 {
        return Err("error chunk carries error value 0".to_string());
    }
    Ok(ErrorChunk {
        errno,
        message,
        offset,
    })
}

/// Parses a NBD_REPLY_TYPE_BLOCK_STATUS payload into its context id and `(length, flags)`
/// descriptors, checked against the request `[0, request_len)`: every length is non-zero, the
/// descriptors before the last one end strictly inside the request, and the last one — which the
/// spec allows to run past the request — is cut at the request end.
pub fn parse_block_status(
    payload: &[u8],
    request_len: u64,
) -> Result<(u32, Vec<(u64, u32)>), String> {
    if payload.len() < 12 || !(payload.len() - 4).is_multiple_of(8) {
        return Err(format!(
            "block status chunk of {} bytes is not 4 + a positive multiple of 8",
            payload.len()
        ));
    }
    let context_id = be_u32(payload);
    let n = (payload.len() - 4) / 8;
    let mut out = Vec::with_capacity(n);
    let mut covered = 0u64;
    for (i, d) in payload[4..].chunks_exact(8).enumerate() {
        let len = u64::from(be_u32(d));
        let flags = be_u32(&d[4..8]);
        if len == 0 {
            return Err(format!("block status descriptor {i} has length 0"));
        }
        if covered >= request_len {
            return Err(format!(
                "block status descriptor {i} starts at +{covered}, past the request end +{request_len}"
            ));
        }
        let len = len.min(request_len - covered);
        covered += len;
        out.push((len, flags));
    }
    Ok((context_id, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn option_reply(option: u32, reply_type: u32, len: u32) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&option.to_be_bytes());
        b[12..16].copy_from_slice(&reply_type.to_be_bytes());
        b[16..20].copy_from_slice(&len.to_be_bytes());
        b
    }

    #[test]
    fn option_reply_header_checks_magic_option_and_length() {
        let ok = parse_option_reply_header(&option_reply(OPT_GO, REP_ACK, 0), OPT_GO).unwrap();
        assert_eq!(
            ok,
            OptionReplyHeader {
                option: OPT_GO,
                reply_type: REP_ACK,
                len: 0
            }
        );
        let err = parse_option_reply_header(&option_reply(OPT_ABORT, REP_ACK, 0), OPT_GO);
        assert!(err.unwrap_err().contains("NBD_OPT_GO"));
        let err = parse_option_reply_header(&option_reply(OPT_GO, REP_ACK, 1 << 20), OPT_GO);
        assert!(err.unwrap_err().contains("too long"));
        let mut bad = option_reply(OPT_GO, REP_ACK, 0);
        bad[7] ^= 0xff;
        assert!(
            parse_option_reply_header(&bad, OPT_GO)
                .unwrap_err()
                .contains("magic")
        );
    }

    #[test]
    fn info_parsing_validates_lengths_and_sizes() {
        let mut export = vec![0, 0];
        export.extend_from_slice(&(1u64 << 30).to_be_bytes());
        export.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_READ_ONLY).to_be_bytes());
        assert_eq!(
            parse_info(&export).unwrap(),
            Info::Export {
                size: 1 << 30,
                flags: TFLAG_HAS_FLAGS | TFLAG_READ_ONLY
            }
        );
        assert!(parse_info(&export[..11]).is_err());

        let block = |min: u32, pref: u32, max: u32| {
            let mut b = vec![0, 3];
            for v in [min, pref, max] {
                b.extend_from_slice(&v.to_be_bytes());
            }
            b
        };
        assert_eq!(
            parse_info(&block(1, 4096, 32 << 20)).unwrap(),
            Info::BlockSize {
                min: 1,
                preferred: 4096,
                max: 32 << 20
            }
        );
        assert!(parse_info(&block(3, 4096, 32 << 20)).is_err());
        assert!(parse_info(&block(1 << 17, 1 << 17, 32 << 20)).is_err());
        assert!(parse_info(&block(512, 4096, 256)).is_err());
        assert_eq!(parse_info(&[0, 9, 1, 2]).unwrap(), Info::Other(9));
        assert!(parse_info(&[0]).is_err());
    }

    #[test]
    fn requests_and_options_encode_big_endian() {
        let r = encode_request(0, CMD_READ, 0x0102_0304_0506_0708, 4096, 512);
        assert_eq!(&r[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&r[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(be_u64(&r[16..24]), 4096);
        assert_eq!(be_u32(&r[24..28]), 512);
        let go = encode_go("img");
        assert_eq!(go, vec![0, 0, 0, 3, b'i', b'm', b'g', 0, 1, 0, 3]);
        let meta = encode_set_meta_context("img", &["base:allocation".to_string()]);
        assert_eq!(be_u32(&meta[7..11]), 1);
        assert_eq!(be_u32(&meta[11..15]), 15);
        let opt = encode_option(OPT_GO, &go);
        assert_eq!(be_u64(&opt), IHAVEOPT);
        assert_eq!(be_u32(&opt[12..16]) as usize, go.len());
    }

    #[test]
    fn reply_start_tells_simple_structured_and_garbage_apart() {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&5u32.to_be_bytes());
        b[8..16].copy_from_slice(&7u64.to_be_bytes());
        assert_eq!(
            parse_reply_start(&b).unwrap(),
            ReplyStart::Simple {
                error: 5,
                cookie: 7
            }
        );
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
        b[6..8].copy_from_slice(&REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        assert_eq!(
            parse_reply_start(&b).unwrap(),
            ReplyStart::Structured {
                flags: REPLY_FLAG_DONE,
                reply_type: REPLY_TYPE_OFFSET_DATA,
                cookie: 7
            }
        );
        b[0..4].copy_from_slice(b"junk");
        assert!(parse_reply_start(&b).unwrap_err().contains("unknown magic"));
        b[0..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
        assert!(parse_reply_start(&b).unwrap_err().contains("extended"));
    }

    #[test]
    fn error_chunks_parse_with_and_without_offset() {
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&3u16.to_be_bytes());
        p.extend_from_slice(b"bad");
        let e = parse_error_chunk(REPLY_TYPE_ERROR, &p).unwrap();
        assert_eq!((e.errno, e.message.as_str(), e.offset), (5, "bad", None));
        assert!(parse_error_chunk(REPLY_TYPE_ERROR_OFFSET, &p).is_err());
        p.extend_from_slice(&42u64.to_be_bytes());
        assert_eq!(
            parse_error_chunk(REPLY_TYPE_ERROR_OFFSET, &p)
                .unwrap()
                .offset,
            Some(42)
        );
        // Message length running past the payload.
        let mut q = 5u32.to_be_bytes().to_vec();
        q.extend_from_slice(&100u16.to_be_bytes());
        assert!(parse_error_chunk(REPLY_TYPE_ERROR, &q).is_err());
        let zero = [0u8; 6];
        assert!(parse_error_chunk(REPLY_TYPE_ERROR, &zero).is_err());
    }

    fn status_payload(ctx: u32, descs: &[(u32, u32)]) -> Vec<u8> {
        let mut p = ctx.to_be_bytes().to_vec();
        for (l, f) in descs {
            p.extend_from_slice(&l.to_be_bytes());
            p.extend_from_slice(&f.to_be_bytes());
        }
        p
    }

    #[test]
    fn block_status_descriptors_are_validated_and_clamped() {
        let (ctx, d) =
            parse_block_status(&status_payload(2, &[(4096, 0), (8192, 3)]), 1 << 20).unwrap();
        assert_eq!((ctx, d), (2, vec![(4096, 0), (8192, 3)]));
        // The last descriptor may run past the request; it is cut at the end.
        let (_, d) =
            parse_block_status(&status_payload(1, &[(4096, 0), (1 << 30, 3)]), 65536).unwrap();
        assert_eq!(d, vec![(4096, 0), (61440, 3)]);
        // A descriptor that starts at or after the request end is a protocol violation.
        let err = parse_block_status(&status_payload(1, &[(65536, 0), (512, 3)]), 65536);
        assert!(err.unwrap_err().contains("past the request end"));
        assert!(
            parse_block_status(&status_payload(1, &[(0, 0)]), 65536)
                .unwrap_err()
                .contains("length 0")
        );
        assert!(parse_block_status(&status_payload(1, &[]), 65536).is_err());
        assert!(parse_block_status(&[0, 0, 0, 1, 0, 0, 0, 1, 0], 65536).is_err());
    }

    #[test]
    fn meta_context_reply_parses() {
        let mut p = 7u32.to_be_bytes().to_vec();
        p.extend_from_slice(b"base:allocation");
        assert_eq!(
            parse_meta_context(&p).unwrap(),
            (7, "base:allocation".to_string())
        );
        assert!(parse_meta_context(&p[..4]).is_err());
    }
}
