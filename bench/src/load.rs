//! The load generator: keep-alive HTTP/1.1 connections to one path, driven
//! at a fixed rate (latency) or as fast as they answer (highest rate), and
//! one connection pulling a large body (bulk throughput).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Where a path is entered: the address the client connects to and the
/// Host it names (a mesh name for a sidecar, the server itself otherwise).
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub host: String,
}

pub struct FixedRate {
    pub latency: Histogram<u64>,
    pub sent: u64,
    pub errors: u64,
    pub elapsed: Duration,
}

async fn connect(t: &Target) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let tcp = TcpStream::connect(t.addr)
        .await
        .with_context(|| format!("connect {}", t.addr))?;
    tcp.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(send)
}

fn request(t: &Target, method: http::Method, path: &str, body: Bytes) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, &t.host)
        .body(Full::new(body))
        .expect("valid request")
}

/// One request and its whole response body; `Err` for a transport error or
/// a status other than 200.
async fn call(send: &mut SendRequest<Full<Bytes>>, req: Request<Full<Bytes>>) -> anyhow::Result<usize> {
    send.ready().await?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    if status != http::StatusCode::OK {
        let text = body.collect().await?.to_bytes();
        bail!("status {status}: {}", String::from_utf8_lossy(&text));
    }
    // Count the body as it streams: a bulk body is never held whole.
    let mut len = 0;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            len += data.len();
        }
    }
    Ok(len)
}

/// `rate` requests per second spread evenly over `conns` connections for
/// `duration`, each a `POST /echo` of `body` bytes.
///
/// Latency is corrected for coordinated omission: a request that could not
/// be sent on time because its connection was still busy is measured from
/// when it should have been sent. A request delayed only by the timer
/// (tokio's has millisecond granularity) is measured from when it was sent,
/// so timer slack does not pose as proxy latency.
pub async fn fixed_rate(
    t: &Target,
    rate: u32,
    conns: u32,
    duration: Duration,
    body: usize,
) -> anyhow::Result<FixedRate> {
    fixed_rate_of(t, rate, conns, duration, (http::Method::POST, "/echo"), body).await
}

/// As `fixed_rate`, for any method and path (`GET /`: an idempotent request,
/// which a sidecar may hedge).
pub async fn fixed_rate_of(
    t: &Target,
    rate: u32,
    conns: u32,
    duration: Duration,
    (method, path): (http::Method, &'static str),
    body: usize,
) -> anyhow::Result<FixedRate> {
    let payload = Bytes::from(vec![b'a'; body]);
    let interval = Duration::from_secs_f64(f64::from(conns) / f64::from(rate));
    let start = Instant::now() + Duration::from_millis(20);
    let end = start + duration;
    let mut tasks = Vec::new();
    for i in 0..conns {
        let mut send = connect(t).await?;
        let (t, payload, method) = (t.clone(), payload.clone(), method.clone());
        let first = start + interval.mul_f64(f64::from(i) / f64::from(conns));
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3).expect("histogram bounds");
            let (mut sent, mut errors) = (0u64, 0u64);
            let mut due = first;
            let mut last_done = Instant::now();
            while due < end {
                tokio::time::sleep_until(due.into()).await;
                let began = if last_done > due { due } else { Instant::now() };
                let req = request(&t, method.clone(), path, payload.clone());
                let ok = call(&mut send, req).await;
                last_done = Instant::now();
                sent += 1;
                match ok {
                    Ok(_) => hist.saturating_record(last_done.duration_since(began).as_nanos() as u64),
                    Err(_) => {
                        errors += 1;
                        if let Ok(s) = connect(&t).await {
                            send = s;
                        }
                    }
                }
                due += interval;
            }
            (hist, sent, errors)
        }));
    }
    let mut out = FixedRate {
        latency: Histogram::new_with_bounds(1_000, 60_000_000_000, 3)?,
        sent: 0,
        errors: 0,
        elapsed: Duration::ZERO,
    };
    for task in tasks {
        let (h, s, e) = task.await?;
        out.latency.add(h)?;
        out.sent += s;
        out.errors += e;
    }
    out.elapsed = start.elapsed();
    Ok(out)
}

/// Requests per second that `conns` connections complete, each sending its
/// next request as soon as the last one is answered.
pub async fn max_rate(t: &Target, conns: u32, duration: Duration, body: usize) -> anyhow::Result<(f64, u64)> {
    let payload = Bytes::from(vec![b'a'; body]);
    let mut senders = Vec::new();
    for _ in 0..conns {
        senders.push(connect(t).await?);
    }
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = Vec::new();
    for mut send in senders {
        let (t, payload) = (t.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut errors) = (0u64, 0u64);
            while Instant::now() < end {
                match call(&mut send, request(&t, http::Method::POST, "/echo", payload.clone())).await {
                    Ok(_) => ok += 1,
                    Err(_) => {
                        errors += 1;
                        match connect(&t).await {
                            Ok(s) => send = s,
                            Err(_) => break,
                        }
                    }
                }
            }
            (ok, errors)
        }));
    }
    let (mut ok, mut errors) = (0, 0);
    for task in tasks {
        let (o, e) = task.await?;
        ok += o;
        errors += e;
    }
    Ok((ok as f64 / start.elapsed().as_secs_f64(), errors))
}

/// Bytes per second of one `GET /bulk` of `bytes` on a fresh connection,
/// from sending the request to its last byte.
pub async fn bulk(t: &Target, bytes: usize) -> anyhow::Result<f64> {
    let mut send = connect(t).await?;
    let start = Instant::now();
    let got = call(
        &mut send,
        request(t, http::Method::GET, &format!("/bulk?bytes={bytes}"), Bytes::new()),
    )
    .await?;
    if got != bytes {
        bail!("bulk body was {got} bytes, not {bytes}");
    }
    Ok(bytes as f64 / start.elapsed().as_secs_f64())
}

/// One request, to check a path works before it is measured.
pub async fn probe(t: &Target) -> anyhow::Result<()> {
    let mut send = connect(t).await?;
    call(
        &mut send,
        request(t, http::Method::POST, "/echo", Bytes::from_static(b"probe")),
    )
    .await
    .map(|_| ())
}
