//! A response body fed by a channel: each message is one frame.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use tokio::sync::mpsc;

pub(crate) struct ChannelBody {
    rx: Receiver,
}

enum Receiver {
    Unbounded(mpsc::UnboundedReceiver<Bytes>),
    /// A sender that gets ahead of a slow client waits for it.
    Bounded(mpsc::Receiver<Bytes>),
}

impl ChannelBody {
    pub(crate) fn new(rx: mpsc::UnboundedReceiver<Bytes>) -> Self {
        ChannelBody {
            rx: Receiver::Unbounded(rx),
        }
    }

    pub(crate) fn bounded(rx: mpsc::Receiver<Bytes>) -> Self {
        ChannelBody {
            rx: Receiver::Bounded(rx),
        }
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let next = match &mut self.rx {
            Receiver::Unbounded(rx) => rx.poll_recv(cx),
            Receiver::Bounded(rx) => rx.poll_recv(cx),
        };
        next.map(|next| next.map(|bytes| Ok(Frame::data(bytes))))
    }
}
