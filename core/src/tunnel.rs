//! The header that opens every tunneled stream (sans-IO).
//!
//! Frame: magic `ISTM`, version (1 byte), kind (1 byte), payload length
//! (u16, big endian), then a JSON payload. The sidecar sends a request to its
//! gateway, the gateway forwards it to the peer gateway, and each answers with
//! a response before any tunneled byte flows.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const MAGIC: &[u8; 4] = b"ISTM";
const VERSION: u8 = 1;
const KIND_REQUEST: u8 = 1;
const KIND_RESPONSE: u8 = 2;
const PREAMBLE: usize = 8;
/// Longest payload accepted; headers are small.
pub const MAX_PAYLOAD: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("not an isthmus tunnel header (bad magic)")]
    BadMagic,
    #[error("unsupported tunnel header version {0}")]
    Version(u8),
    #[error("unexpected tunnel frame kind {0}")]
    Kind(u8),
    #[error("tunnel header too long ({0} bytes)")]
    TooLong(usize),
    #[error("tunnel header payload: {0}")]
    Payload(#[from] serde_json::Error),
    #[error("tunnel header i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Where a tunneled connection should go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelRequest {
    /// Destination cluster.
    pub cluster: String,
    pub namespace: String,
    pub service: String,
    pub port: u16,
    /// Cluster the connection comes from (informational; identity is proven
    /// end to end by the inner mTLS session).
    pub source_cluster: String,
    /// W3C `traceparent` of the caller, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// Why a tunnel was refused; the caller's sidecar reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefuseCode {
    UnknownPeer,
    NotExported,
    PortMismatch,
    NoEndpoints,
    PeerUnreachable,
    UpstreamConnect,
    BadRequest,
}

impl RefuseCode {
    pub const ALL: [RefuseCode; 7] = [
        RefuseCode::UnknownPeer,
        RefuseCode::NotExported,
        RefuseCode::PortMismatch,
        RefuseCode::NoEndpoints,
        RefuseCode::PeerUnreachable,
        RefuseCode::UpstreamConnect,
        RefuseCode::BadRequest,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefuseCode::UnknownPeer => "unknown_peer",
            RefuseCode::NotExported => "not_exported",
            RefuseCode::PortMismatch => "port_mismatch",
            RefuseCode::NoEndpoints => "no_endpoints",
            RefuseCode::PeerUnreachable => "peer_unreachable",
            RefuseCode::UpstreamConnect => "upstream_connect",
            RefuseCode::BadRequest => "bad_request",
        }
    }
}

impl TunnelResponse {
    /// `ok`, or the refusal code, for metrics and logs.
    pub fn result(&self) -> &'static str {
        match self {
            TunnelResponse::Ok => "ok",
            TunnelResponse::Refused { code, .. } => code.as_str(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum TunnelResponse {
    Ok,
    Refused { code: RefuseCode, reason: String },
}

fn encode(kind: u8, payload: &[u8]) -> Result<Vec<u8>, HeaderError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(HeaderError::TooLong(payload.len()));
    }
    let mut out = Vec::with_capacity(PREAMBLE + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Parse the preamble: payload length, or an error. Needs 8 bytes.
fn parse_preamble(pre: &[u8; PREAMBLE], kind: u8) -> Result<usize, HeaderError> {
    if &pre[..4] != MAGIC {
        return Err(HeaderError::BadMagic);
    }
    if pre[4] != VERSION {
        return Err(HeaderError::Version(pre[4]));
    }
    if pre[5] != kind {
        return Err(HeaderError::Kind(pre[5]));
    }
    let len = u16::from_be_bytes([pre[6], pre[7]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(HeaderError::TooLong(len));
    }
    Ok(len)
}

/// Decode one frame from the front of `buf`: `Ok(None)` if more bytes are needed.
fn decode<T: for<'de> Deserialize<'de>>(buf: &[u8], kind: u8) -> Result<Option<(T, usize)>, HeaderError> {
    if buf.len() < PREAMBLE {
        return Ok(None);
    }
    let pre: &[u8; PREAMBLE] = buf[..PREAMBLE].try_into().expect("length checked");
    let len = parse_preamble(pre, kind)?;
    if buf.len() < PREAMBLE + len {
        return Ok(None);
    }
    let v = serde_json::from_slice(&buf[PREAMBLE..PREAMBLE + len])?;
    Ok(Some((v, PREAMBLE + len)))
}

impl TunnelRequest {
    pub fn encode(&self) -> Result<Vec<u8>, HeaderError> {
        encode(KIND_REQUEST, &serde_json::to_vec(self)?)
    }

    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, HeaderError> {
        decode(buf, KIND_REQUEST)
    }

    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Self, HeaderError> {
        read_frame(r, KIND_REQUEST).await
    }

    pub async fn write<W: AsyncWrite + Unpin>(&self, w: &mut W) -> Result<(), HeaderError> {
        w.write_all(&self.encode()?).await?;
        w.flush().await?;
        Ok(())
    }
}

impl TunnelResponse {
    pub fn refused(code: RefuseCode, reason: impl Into<String>) -> Self {
        TunnelResponse::Refused {
            code,
            reason: reason.into(),
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, HeaderError> {
        encode(KIND_RESPONSE, &serde_json::to_vec(self)?)
    }

    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, HeaderError> {
        decode(buf, KIND_RESPONSE)
    }

    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Self, HeaderError> {
        read_frame(r, KIND_RESPONSE).await
    }

    pub async fn write<W: AsyncWrite + Unpin>(&self, w: &mut W) -> Result<(), HeaderError> {
        w.write_all(&self.encode()?).await?;
        w.flush().await?;
        Ok(())
    }
}

/// Read exactly one frame, never past it: bytes after the header belong to
/// the tunneled connection.
async fn read_frame<R, T>(r: &mut R, kind: u8) -> Result<T, HeaderError>
where
    R: AsyncRead + Unpin,
    T: for<'de> Deserialize<'de>,
{
    let mut pre = [0u8; PREAMBLE];
    r.read_exact(&mut pre).await?;
    let len = parse_preamble(&pre, kind)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(serde_json::from_slice(&payload)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> TunnelRequest {
        TunnelRequest {
            cluster: "east".into(),
            namespace: "demo".into(),
            service: "echo".into(),
            port: 8080,
            source_cluster: "west".into(),
            traceparent: None,
        }
    }

    #[test]
    fn request_round_trip_byte_by_byte() {
        let bytes = req().encode().unwrap();
        for cut in 0..bytes.len() {
            assert!(TunnelRequest::decode(&bytes[..cut]).unwrap().is_none(), "cut {cut}");
        }
        let mut with_tail = bytes.clone();
        with_tail.extend_from_slice(b"tunneled bytes");
        let (r, used) = TunnelRequest::decode(&with_tail).unwrap().unwrap();
        assert_eq!(r, req());
        assert_eq!(used, bytes.len());
    }

    #[test]
    fn refuses_bad_frames() {
        let mut bytes = req().encode().unwrap();
        assert!(matches!(TunnelResponse::decode(&bytes), Err(HeaderError::Kind(1))));
        bytes[4] = 9;
        assert!(matches!(TunnelRequest::decode(&bytes), Err(HeaderError::Version(9))));
        assert!(matches!(
            TunnelRequest::decode(b"GET / HTTP/1.1\r\n"),
            Err(HeaderError::BadMagic)
        ));
        let mut long = b"ISTM\x01\x01".to_vec();
        long.extend_from_slice(&(60000u16).to_be_bytes());
        assert!(matches!(TunnelRequest::decode(&long), Err(HeaderError::TooLong(60000))));
    }

    #[test]
    fn response_round_trip() {
        for code in RefuseCode::ALL {
            // The metric label and the wire name are the same word.
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
        }
        for r in [
            TunnelResponse::Ok,
            TunnelResponse::refused(RefuseCode::NotExported, "demo/x is not exported"),
        ] {
            let (d, _) = TunnelResponse::decode(&r.encode().unwrap()).unwrap().unwrap();
            assert_eq!(d, r);
        }
    }

    #[tokio::test]
    async fn async_read_stops_at_frame_end() {
        let mut bytes = req().encode().unwrap();
        bytes.extend_from_slice(b"rest");
        let mut cur = std::io::Cursor::new(bytes);
        assert_eq!(TunnelRequest::read(&mut cur).await.unwrap(), req());
        let mut rest = String::new();
        cur.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "rest");
    }
}
