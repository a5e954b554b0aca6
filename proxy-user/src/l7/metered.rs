//! Body sizes for Istio's `istio_request_bytes` / `istio_response_bytes`: the request body
//! is counted as it is read ([`Metered`]), and the response body reports both sizes when
//! it ends or is dropped ([`Reported`]) — a request is sized once, however many attempts
//! it took.
use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};

use super::{Body, Guarded};
use crate::metrics::istio::BodySizes;

/// A body whose data bytes are added to a shared count as they pass.
pub struct Metered<B> {
    inner: B,
    bytes: Arc<AtomicU64>,
}

impl<B> Metered<B> {
    pub fn new(inner: B, bytes: Arc<AtomicU64>) -> Self {
        Self { inner, bytes }
    }
}

impl<B> hyper::body::Body for Metered<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
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

/// Held by a response body until it ends or is dropped ([`Guarded`]): then observes
/// the request's body size (counted by a [`Metered`] request body) and the response's.
pub struct Reported {
    request: Arc<AtomicU64>,
    response: Arc<AtomicU64>,
    sizes: Option<BodySizes>,
}

impl Reported {
    pub fn wrap(inner: Body, request: Arc<AtomicU64>, sizes: BodySizes) -> Body {
        let response = Arc::<AtomicU64>::default();
        let counted = Metered::new(inner, response.clone());
        Guarded::wrap(
            counted,
            Self {
                request,
                response,
                sizes: Some(sizes),
            },
        )
    }
}

impl Drop for Reported {
    fn drop(&mut self) {
        if let Some(sizes) = self.sizes.take() {
            sizes.observe(
                self.request.load(Ordering::Relaxed),
                self.response.load(Ordering::Relaxed),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Full};

    use super::*;
    use crate::metrics::istio::Istio;

    #[tokio::test]
    async fn both_sizes_are_observed_once_when_the_response_ends() {
        let istio = Istio::default();
        let mut registry = prometheus_client::registry::Registry::default();
        istio.register(&mut registry);
        let text = |r: &prometheus_client::registry::Registry| {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, r).unwrap();
            out
        };
        let sample = |text: &str, name: &str| -> String {
            text.lines()
                .find(|l| l.starts_with(&format!("{name}{{")))
                .and_then(|l| l.rsplit(' ').next())
                .unwrap_or("absent")
                .to_owned()
        };
        let counted = Arc::new(AtomicU64::new(0));
        let req = Metered::new(Full::new(Bytes::from_static(b"hello")), counted.clone());
        assert_eq!(req.collect().await.unwrap().to_bytes().len(), 5);
        let sizes = istio.sizes(&crate::metrics::istio::tests::labels());
        let resp = Full::new(Bytes::from(vec![0u8; 1234]))
            .map_err(|never| match never {})
            .boxed();
        let body = Reported::wrap(resp, counted, sizes);
        assert_eq!(sample(&text(&registry), "istio_response_bytes_count"), "0");
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 1234);
        let after = text(&registry);
        assert_eq!(sample(&after, "istio_request_bytes_sum"), "5.0");
        assert_eq!(sample(&after, "istio_request_bytes_count"), "1");
        assert_eq!(sample(&after, "istio_response_bytes_sum"), "1234.0");
        assert_eq!(sample(&after, "istio_response_bytes_count"), "1");
    }
}
