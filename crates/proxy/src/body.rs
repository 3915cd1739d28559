//! The response body streamed back from a backend.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::InFlight;
use crate::pool::Sender;

/// Streams a backend's response body to the client. Until it is done (or dropped) it keeps the
/// backend's in-flight count raised, so a drain waits for it; at its end the connection goes
/// back to the backend's pool.
pub(crate) struct UpstreamResponse {
    inner: Incoming,
    sender: Option<Sender>,
    claim: InFlight,
    done: bool,
}

impl UpstreamResponse {
    pub(crate) fn new(inner: Incoming, sender: Sender, claim: InFlight) -> Self {
        UpstreamResponse {
            inner,
            sender: Some(sender),
            claim,
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
            Poll::Ready(None) => self.done = true,
            Poll::Ready(Some(Err(_))) => self.sender = None,
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

impl Drop for UpstreamResponse {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.take()
            && (self.done || self.inner.is_end_stream())
        {
            self.claim.backend().pool.checkin(sender);
        }
    }
}
