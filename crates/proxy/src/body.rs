//! Bodies: what goes to a backend, and what comes back to the client.
//!
//! Plain enums rather than boxed trait objects: no allocation per request for the body.
//! Both count their bytes into the role's and the backend's metrics as they stream.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::pool::Sender;
use crate::{Backend, InFlight, TrafficMetrics};

/// The request body grew past the role's `max_body`.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {limit} bytes")]
pub(crate) struct BodyTooLarge {
    pub(crate) limit: u64,
}

/// The client's request body could not be read: a bad chunk size, a bad trailer, or an end
/// before its declared length. The client's fault, answered with 400, never the backend's.
#[derive(Debug, thiserror::Error)]
#[error("the request body is malformed or ended early: {0}")]
pub(crate) struct ClientBodyError(#[source] pub(crate) hyper::Error);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where a request body's bytes are counted.
#[derive(Debug)]
pub(crate) struct Meter {
    pub(crate) role: Arc<TrafficMetrics>,
    /// The backend of the current attempt.
    pub(crate) backend: Option<Arc<Backend>>,
}

/// The body sent to a backend: the client's, counted against `max_body`.
#[derive(Debug)]
pub(crate) struct UpstreamBody {
    pub(crate) body: Incoming,
    pub(crate) seen: u64,
    pub(crate) limit: u64,
    pub(crate) meter: Meter,
}

impl UpstreamBody {
    /// Counts the bytes of this attempt against `backend`.
    pub(crate) fn meter_for(&mut self, backend: &Arc<Backend>) {
        if !self.body.is_end_stream() {
            self.meter.backend = Some(backend.clone());
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let bytes = frame.data_ref().map_or(0, |d| d.len() as u64);
                this.seen += bytes;
                if this.seen > this.limit {
                    let limit = this.limit;
                    return Poll::Ready(Some(Err(Box::new(BodyTooLarge { limit }))));
                }
                this.meter.role.add_received(bytes);
                if let Some(backend) = &this.meter.backend {
                    backend.metrics.add_received(bytes);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                Poll::Ready(Some(Err(Box::new(ClientBodyError(error)))))
            }
            other => other.map(|frame| frame.map(|result| result.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The body returned to the client: a backend's response, or a short message of the proxy's own.
#[derive(Debug)]
pub struct ResponseBody(Kind);

#[derive(Debug)]
enum Kind {
    Upstream(UpstreamResponse),
    Raw(crate::raw::RawBody),
    Message(Option<Bytes>),
}

impl ResponseBody {
    pub(crate) fn upstream(response: UpstreamResponse) -> Self {
        ResponseBody(Kind::Upstream(response))
    }

    pub(crate) fn raw(body: crate::raw::RawBody) -> Self {
        ResponseBody(Kind::Raw(body))
    }

    pub(crate) fn empty() -> Self {
        ResponseBody(Kind::Message(None))
    }

    pub(crate) fn message(text: Bytes) -> Self {
        ResponseBody(Kind::Message(Some(text)))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().0 {
            Kind::Upstream(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Kind::Raw(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Kind::Message(text) => Poll::Ready(text.take().map(|t| Ok(Frame::data(t)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Upstream(body) => body.is_end_stream(),
            Kind::Raw(body) => body.is_end_stream(),
            Kind::Message(text) => text.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Upstream(body) => body.size_hint(),
            Kind::Raw(body) => body.size_hint(),
            Kind::Message(text) => {
                SizeHint::with_exact(text.as_ref().map_or(0, |t| t.len() as u64))
            }
        }
    }
}

/// Streams a backend's response body to the client. Until it is done (or dropped) it keeps the
/// backend's in-flight count raised, so a drain waits for it; at its end the connection goes
/// back to the backend's pool.
#[derive(Debug)]
pub(crate) struct UpstreamResponse {
    inner: Incoming,
    sender: Option<Sender>,
    claim: InFlight,
    role: Arc<TrafficMetrics>,
    done: bool,
}

impl UpstreamResponse {
    pub(crate) fn new(
        inner: Incoming,
        sender: Sender,
        claim: InFlight,
        role: Arc<TrafficMetrics>,
    ) -> Self {
        UpstreamResponse {
            inner,
            sender: Some(sender),
            claim,
            role,
            done: false,
        }
    }
}

impl Body for UpstreamResponse {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let bytes = frame.data_ref().map_or(0, |d| d.len() as u64);
                self.role.add_sent(bytes);
                self.claim.backend().metrics.add_sent(bytes);
            }
            Poll::Ready(None) => self.done = true,
            Poll::Ready(Some(Err(_))) => self.sender = None,
            Poll::Pending => {}
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

impl Drop for UpstreamResponse {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.take()
            && (self.done || self.inner.is_end_stream())
        {
            self.claim.backend().pool.checkin(sender);
        }
    }
}
