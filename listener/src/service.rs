//! The router as hyper calls it on one connection: each request counted in flight until
//! its response body is done (what the idle timer and the eviction look at), and its body
//! bounded in time.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body as AxumBody;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use tokio::time::{Instant, Sleep};
use tower::Service as _;

use crate::pool::{InFlight, Slot};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `router` serving one connection.
#[derive(Clone)]
pub(crate) struct Tracked {
    router: Router,
    slot: Arc<Slot>,
    body_timeout: Duration,
}

impl Tracked {
    pub(crate) fn new(router: Router, slot: Arc<Slot>, body_timeout: Duration) -> Self {
        Self {
            router,
            slot,
            body_timeout,
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response<Guarded>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let in_flight = self.slot.begin();
        let deadline = Instant::now() + self.body_timeout;
        let timeout = self.body_timeout;
        let request = request.map(|body| TimedBody {
            body,
            deadline,
            timeout,
            sleep: None,
            done: false,
        });
        let mut router = self.router.clone();
        Box::pin(async move {
            let response = router.call(request).await?;
            Ok(response.map(|body| Guarded {
                body,
                _in_flight: in_flight,
            }))
        })
    }
}

/// A request body that must arrive whole by its deadline; past it, reading fails with an
/// `io::Error` of kind `TimedOut` (which `kbs-web` answers with 408).
pub(crate) struct TimedBody {
    body: Incoming,
    deadline: Instant,
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    done: bool,
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(BoxError::from))),
            Poll::Pending => {
                let deadline = this.deadline;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.done = true;
                let message = format!(
                    "request body not received within {}s",
                    this.timeout.as_secs_f64()
                );
                Poll::Ready(Some(Err(
                    io::Error::new(io::ErrorKind::TimedOut, message).into()
                )))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A response body that keeps its request in flight until it is done (or dropped).
pub(crate) struct Guarded {
    body: AxumBody,
    _in_flight: InFlight,
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
