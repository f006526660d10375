//! Bodies that stream: a channel-fed body (frames are sent as they are
//! produced, never coalesced).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use tokio::sync::mpsc;

use crate::server::BoxError;

/// A body whose frames arrive through a channel. An `Err` item ends the
/// body with an error (for HTTP/1.1: the connection is cut without the
/// final chunk, which the peer sees as a reset).
#[derive(Debug)]
pub struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, BoxError>>,
}

impl ChannelBody {
    /// A body and the sender that feeds it (`depth` frames may wait).
    pub fn new(depth: usize) -> (mpsc::Sender<Result<Bytes, BoxError>>, ChannelBody) {
        let (tx, rx) = mpsc::channel(depth);
        (tx, ChannelBody { rx })
    }
}

impl HttpBody for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(b))) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A body of a few chunks known in advance, sent as they are (an export
/// request's header and its batch, with no copy joining them). Its exact
/// length is known, so HTTP/1.1 sends it with `content-length`.
#[derive(Debug, Default)]
pub struct Chunks(std::collections::VecDeque<Bytes>);

impl Chunks {
    /// The chunks' total length.
    pub fn len(&self) -> usize {
        self.0.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a chunk at the front.
    pub fn prepend(&mut self, b: Bytes) {
        self.0.push_front(b);
    }
}

impl<const N: usize> From<[Bytes; N]> for Chunks {
    fn from(parts: [Bytes; N]) -> Chunks {
        Chunks(parts.into_iter().filter(|b| !b.is_empty()).collect())
    }
}

impl From<Vec<u8>> for Chunks {
    fn from(v: Vec<u8>) -> Chunks {
        Chunks::from([Bytes::from(v)])
    }
}

impl HttpBody for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn chunks_are_sent_in_order_with_their_exact_length() {
        let mut c = Chunks::from([
            Bytes::from_static(b"head"),
            Bytes::new(),
            Bytes::from_static(b"items"),
        ]);
        c.prepend(Bytes::from_static(b"<"));
        assert_eq!(c.len(), 10);
        assert_eq!(c.size_hint().exact(), Some(10));
        let mut frames = Vec::new();
        while let Some(f) = c.frame().await {
            frames.push(f.unwrap().into_data().unwrap());
        }
        assert_eq!(frames, ["<", "head", "items"]);
        assert!(c.is_end_stream());
        assert_eq!(c.size_hint().exact(), Some(0));
    }
}
