//! Option haggling, from the server's greeting to the transmission phase: fixed newstyle,
//! `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_SET_META_CONTEXT`, then `NBD_OPT_GO` (falling back to
//! `NBD_OPT_EXPORT_NAME` only if the server does not know `NBD_OPT_GO`). Must not send
//! transmission requests.

use super::proto::{self, Info};
use super::wire::Wire;
use super::{ConnectOptions, Error, ExportInfo, MetaContext};

/// What the handshake settled.
pub(crate) struct Negotiated {
    pub info: ExportInfo,
    pub structured: bool,
    pub contexts: Vec<MetaContext>,
}

/// Default size constraints when the server does not advertise any (spec "Size constraints").
const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;

pub(crate) fn negotiate(wire: &mut Wire, opts: &ConnectOptions) -> Result<Negotiated, Error> {
    check_options(opts)?;
    let mut greeting = [0u8; 18];
    wire.read_exact(&mut greeting[..16], "reading the server greeting")?;
    if proto::be_u64(&greeting[0..8]) != proto::NBDMAGIC {
        return Err(Error::Protocol(format!(
            "greeting starts with {:#018x}, not NBDMAGIC: this is not an NBD server",
            proto::be_u64(&greeting[0..8])
        )));
    }
    match proto::be_u64(&greeting[8..16]) {
        proto::IHAVEOPT => {}
        proto::OLDSTYLE_MAGIC => return Err(Error::Unsupported("oldstyle negotiation only")),
        other => {
            return Err(Error::Protocol(format!(
                "greeting has second magic {other:#018x}, expected IHAVEOPT"
            )));
        }
    }
    wire.read_exact(&mut greeting[16..18], "reading the handshake flags")?;
    let server_flags = proto::be_u16(&greeting[16..18]);
    if server_flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Error::Unsupported("fixed newstyle negotiation"));
    }
    let no_zeroes = server_flags & proto::FLAG_NO_ZEROES != 0;
    let mut client_flags = proto::FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        client_flags |= proto::FLAG_C_NO_ZEROES;
    }
    wire.write_all(&client_flags.to_be_bytes(), "sending the client flags")?;

    // Structured replies: always asked for (reads report holes and errors properly); required
    // for metadata contexts.
    let mut structured = false;
    send_option(wire, proto::OPT_STRUCTURED_REPLY, &[])?;
    let (header, payload) = read_option_reply(wire, proto::OPT_STRUCTURED_REPLY)?;
    match header.reply_type {
        proto::REP_ACK => structured = true,
        t if t & proto::REP_ERR_BIT != 0 && opts.meta_contexts.is_empty() => {}
        t if t & proto::REP_ERR_BIT != 0 => {
            return Err(refused(proto::OPT_STRUCTURED_REPLY, t, &payload));
        }
        t => return Err(unexpected_reply(proto::OPT_STRUCTURED_REPLY, t)),
    }

    let contexts = if opts.meta_contexts.is_empty() {
        Vec::new()
    } else {
        set_meta_contexts(wire, opts)?
    };

    let info = go(wire, opts, no_zeroes)?;
    Ok(Negotiated {
        info,
        structured,
        contexts,
    })
}

fn check_options(opts: &ConnectOptions) -> Result<(), Error> {
    if opts.export_name.len() > proto::MAX_STRING {
        return Err(Error::InvalidOption(
            "export name longer than 4096 bytes".to_string(),
        ));
    }
    for name in &opts.meta_contexts {
        if name.is_empty() || name.len() > proto::MAX_STRING || !name.contains(':') {
            return Err(Error::InvalidOption(format!(
                "meta context {name:?} must be 'namespace:name' of at most 4096 bytes"
            )));
        }
    }
    if opts.pipeline_depth == 0 {
        return Err(Error::InvalidOption(
            "pipeline depth must be at least 1".to_string(),
        ));
    }
    if opts.request_size == 0 {
        return Err(Error::InvalidOption(
            "request size must be positive".to_string(),
        ));
    }
    Ok(())
}

fn set_meta_contexts(wire: &mut Wire, opts: &ConnectOptions) -> Result<Vec<MetaContext>, Error> {
    let data = proto::encode_set_meta_context(&opts.export_name, &opts.meta_contexts);
    send_option(wire, proto::OPT_SET_META_CONTEXT, &data)?;
    let mut granted: Vec<MetaContext> = Vec::new();
    loop {
        let (header, payload) = read_option_reply(wire, proto::OPT_SET_META_CONTEXT)?;
        match header.reply_type {
            proto::REP_META_CONTEXT => {
                let (id, name) = proto::parse_meta_context(&payload).map_err(Error::Protocol)?;
                if granted.iter().any(|c| c.id == id) {
                    return Err(Error::Protocol(format!(
                        "meta context id {id} granted twice"
                    )));
                }
                granted.push(MetaContext { id, name });
            }
            proto::REP_ACK => break,
            t if t & proto::REP_ERR_BIT != 0 => {
                return Err(refused(proto::OPT_SET_META_CONTEXT, t, &payload));
            }
            t => return Err(unexpected_reply(proto::OPT_SET_META_CONTEXT, t)),
        }
    }
    for wanted in &opts.meta_contexts {
        if !granted.iter().any(|c| &c.name == wanted) {
            return Err(Error::ContextNotGranted(wanted.clone()));
        }
    }
    Ok(granted)
}

fn go(wire: &mut Wire, opts: &ConnectOptions, no_zeroes: bool) -> Result<ExportInfo, Error> {
    send_option(wire, proto::OPT_GO, &proto::encode_go(&opts.export_name))?;
    let mut export: Option<(u64, u16)> = None;
    let mut sizes: Option<(u32, u32, u32)> = None;
    loop {
        let (header, payload) = read_option_reply(wire, proto::OPT_GO)?;
        match header.reply_type {
            proto::REP_INFO => match proto::parse_info(&payload).map_err(Error::Protocol)? {
                Info::Export { size, flags } => export = Some((size, flags)),
                Info::BlockSize {
                    min,
                    preferred,
                    max,
                } => sizes = Some((min, preferred, max)),
                Info::Other(_) => {}
            },
            proto::REP_ACK => break,
            proto::REP_ERR_UNSUP => return export_name_fallback(wire, opts, no_zeroes),
            t if t & proto::REP_ERR_BIT != 0 => return Err(refused(proto::OPT_GO, t, &payload)),
            t => return Err(unexpected_reply(proto::OPT_GO, t)),
        }
    }
    let (size, flags) = export.ok_or_else(|| {
        Error::Protocol("NBD_OPT_GO succeeded without NBD_INFO_EXPORT".to_string())
    })?;
    let (min_block, preferred_block, max_payload) = sizes.unwrap_or((1, 4096, DEFAULT_MAX_PAYLOAD));
    Ok(ExportInfo {
        size,
        flags,
        min_block,
        preferred_block,
        max_payload,
    })
}

/// For servers that predate `NBD_OPT_GO`: no error reporting, no size constraints.
fn export_name_fallback(
    wire: &mut Wire,
    opts: &ConnectOptions,
    no_zeroes: bool,
) -> Result<ExportInfo, Error> {
    send_option(wire, proto::OPT_EXPORT_NAME, opts.export_name.as_bytes())?;
    let mut b = [0u8; 10 + 124];
    let n = if no_zeroes { 10 } else { b.len() };
    wire.read_exact(&mut b[..n], "reading the NBD_OPT_EXPORT_NAME reply")?;
    Ok(ExportInfo {
        size: proto::be_u64(&b[0..8]),
        flags: proto::be_u16(&b[8..10]),
        min_block: 1,
        preferred_block: 4096,
        max_payload: DEFAULT_MAX_PAYLOAD,
    })
}

fn send_option(wire: &mut Wire, option: u32, data: &[u8]) -> Result<(), Error> {
    wire.write_all(&proto::encode_option(option, data), "sending an option")
}

fn read_option_reply(
    wire: &mut Wire,
    option: u32,
) -> Result<(proto::OptionReplyHeader, Vec<u8>), Error> {
    let mut b = [0u8; 20];
    wire.read_exact(&mut b, "reading an option reply")?;
    let header = proto::parse_option_reply_header(&b, option).map_err(Error::Protocol)?;
    let mut payload = vec![0u8; header.len as usize];
    wire.read_exact(&mut payload, "reading an option reply")?;
    Ok((header, payload))
}

fn refused(option: u32, reply_type: u32, payload: &[u8]) -> Error {
    let message = String::from_utf8_lossy(payload).into_owned();
    Error::Refused {
        option: proto::option_name(option),
        reason: proto::option_error_name(reply_type),
        message,
    }
}

fn unexpected_reply(option: u32, reply_type: u32) -> Error {
    Error::Protocol(format!(
        "unexpected reply type {reply_type} to {}",
        proto::option_name(option)
    ))
}
