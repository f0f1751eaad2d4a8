//! Request and response bodies: the boxed body type the proxy passes on,
//! and how a request's body is kept so the request can be sent again.
//!
//! A body with a declared length up to `BUFFER_BODY_MAX` is read whole
//! before the request is sent on, so its HEADERS and DATA frames leave in
//! one TLS record and one write (streamed, HEADERS goes alone first: a
//! write, and a wake-up at the peer, more per request). A body of unknown
//! length (gRPC clients send none) streams as it comes, with a copy kept as
//! it passes, up to the same size: waiting for its end could deadlock a
//! streaming call whose client waits for the server's first message.
//!
//! An answer to a request that could be sent again is read whole too when
//! it declares a length up to `WHOLE_ANSWER_MAX`, before its head goes to
//! the caller: if the session dies between the head and the end of the
//! body (a gateway killed mid-answer), that is a failed attempt to send
//! again, not a response broken off under the caller. Larger answers and
//! answers of unknown length (streams, gRPC) pass on as they come.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};

/// What the proxy passes on: any body, boxed.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// Largest request body kept to be sent again (and read whole when its
/// length is declared).
pub const BUFFER_BODY_MAX: u64 = 16 * 1024;

/// Largest answer read whole before its head is passed on (see above).
pub const WHOLE_ANSWER_MAX: u64 = 64 * 1024;

/// The length a message's `Content-Length` declares, if any.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
}

/// The answer, its body read whole (trailers kept) if `whole` is asked for
/// and it declares a length up to `WHOLE_ANSWER_MAX`, else as it streams.
pub async fn whole_if_small(resp: Response<Incoming>, whole: bool) -> Result<Response<Body>, hyper::Error> {
    let small = declared_length(resp.headers()).is_some_and(|n| n <= WHOLE_ANSWER_MAX);
    if !whole || !small || resp.body().is_end_stream() {
        return Ok(resp.map(|b| b.boxed()));
    }
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await?;
    Ok(Response::from_parts(parts, collected.map_err(|n| match n {}).boxed()))
}

pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|n| match n {}).boxed()
}

pub fn empty() -> Body {
    http_body_util::Empty::new().map_err(|n| match n {}).boxed()
}

/// The request with its body read whole if it is small, and how to get that
/// body again to resend it.
pub async fn buffer_small_body(req: Request<Incoming>) -> Result<(Request<Body>, Replay), hyper::Error> {
    if req.body().is_end_stream() {
        return Ok((req.map(|_| empty()), Replay::Ready(Bytes::new())));
    }
    let declared = declared_length(req.headers());
    let (parts, body) = req.into_parts();
    match declared {
        Some(n) if n <= BUFFER_BODY_MAX => {
            let bytes = body.collect().await?.to_bytes();
            Ok((Request::from_parts(parts, full(bytes.clone())), Replay::Ready(bytes)))
        }
        Some(_) => Ok((Request::from_parts(parts, body.boxed()), Replay::No)),
        None => {
            let (tee, recording) = Tee::new(body);
            Ok((Request::from_parts(parts, tee.boxed()), Replay::Recorded(recording)))
        }
    }
}

/// When a request's body ended: `None` until it has.
pub type Ended = tokio::sync::watch::Receiver<Option<tokio::time::Instant>>;

/// The body, and when it ended (at once for one already complete): a
/// request's time limit counts from then.
pub fn watch_end(req: Request<Body>) -> (Request<Body>, Ended) {
    let done = req.body().is_end_stream();
    let (tx, rx) = tokio::sync::watch::channel(done.then(tokio::time::Instant::now));
    if done {
        return (req, rx);
    }
    (req.map(|inner| EndWatch { inner, tx }.boxed()), rx)
}

/// A body that says when it has ended.
struct EndWatch {
    inner: Body,
    tx: tokio::sync::watch::Sender<Option<tokio::time::Instant>>,
}

impl hyper::body::Body for EndWatch {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let ended = matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) || self.inner.is_end_stream();
        if ended && self.tx.borrow().is_none() {
            self.tx.send_replace(Some(tokio::time::Instant::now()));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How a request's body can be had again, to resend the request.
pub enum Replay {
    Ready(Bytes),
    Recorded(Recording),
    No,
}

impl Replay {
    /// The whole body, if it is at hand (a recording only once it ended).
    pub fn body(&self) -> Option<Bytes> {
        match self {
            Replay::Ready(b) => Some(b.clone()),
            Replay::Recorded(r) => match &*r.0.lock().expect("recording lock") {
                Recorded::Done(b) => Some(b.clone()),
                _ => None,
            },
            Replay::No => None,
        }
    }
}

#[derive(Clone)]
pub struct Recording(Arc<Mutex<Recorded>>);

enum Recorded {
    Partial(BytesMut),
    Done(Bytes),
    /// Too large to keep, or it had trailers.
    Abandoned,
}

/// A body passed through unchanged while a copy of it is recorded.
struct Tee {
    inner: Incoming,
    rec: Recording,
}

impl Tee {
    fn new(inner: Incoming) -> (Self, Recording) {
        let rec = Recording(Arc::new(Mutex::new(Recorded::Partial(BytesMut::new()))));
        (
            Tee {
                inner,
                rec: rec.clone(),
            },
            rec,
        )
    }

    fn finish(&self) {
        let mut r = self.rec.0.lock().expect("recording lock");
        if let Recorded::Partial(buf) = &mut *r {
            *r = Recorded::Done(std::mem::take(buf).freeze());
        }
    }
}

impl hyper::body::Body for Tee {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let mut r = self.rec.0.lock().expect("recording lock");
                match (&mut *r, frame.data_ref()) {
                    (Recorded::Partial(buf), Some(d)) if (buf.len() + d.len()) as u64 <= BUFFER_BODY_MAX => {
                        buf.extend_from_slice(d)
                    }
                    _ => *r = Recorded::Abandoned,
                }
                drop(r);
                // Whoever polls may stop at the last frame without asking
                // for the end.
                if self.inner.is_end_stream() {
                    self.finish();
                }
            }
            Poll::Ready(None) => self.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
