//! The HTTP listener both services share (the agent's ingest and admin API, the relay's admin
//! API): a cap on connections, and deadlines for a request's headers, its body and an idle
//! connection, so that clients that trickle bytes, stop halfway or just hold sockets cannot
//! exhaust descriptors and take the process's other listeners down with them.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{BoxError, Router};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::ErrorAnswer;

/// What keeps slow, silent or too many clients from holding the listener (`[http]` on the agent, `[admin]` on the relay).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// The configuration section these come from (`http`, `admin`), named in answers.
    pub section: &'static str,
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
}

impl<S: crate::config::AdminDefaults> From<&crate::config::AdminListenerConfig<S>>
    for ConnectionLimits
{
    fn from(admin: &crate::config::AdminListenerConfig<S>) -> ConnectionLimits {
        ConnectionLimits {
            section: "admin",
            max_connections: admin.max_connections,
            header_timeout: Duration::from_secs(admin.header_timeout_secs),
            body_timeout: Duration::from_secs(admin.body_timeout_secs),
            idle_timeout: Duration::from_secs(admin.idle_timeout_secs),
        }
    }
}

/// How long a connection with a request in hand may take to answer it once a stop is asked
/// for; the service's own drain timeout is longer, so the listener always ends within it.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Refused connections are logged at most this often: a flood must not flood the journal too.
const REFUSALS_REPORTED_EVERY: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `stop`, then lets the requests in hand finish (up to
/// [`STOP_GRACE`]) and returns.
///
/// Over `max_connections`, a new connection gets a 503 written without waiting and is closed,
/// so the accept loop never blocks and the listener holds at most that many descriptors.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    let mut refusals = Refusals::default();
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            // The client went away before it was accepted: its problem, not the listener's.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of descriptors, most likely. Accepting again at once would spin a core
                // that MQTT and the log need, and only time (the timeouts) frees descriptors.
                tracing::warn!(error = %e, "cannot accept an HTTP connection; trying again in 1 s");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                connections.spawn(serve_connection(
                    stream,
                    peer,
                    app.clone(),
                    limits,
                    stop.clone(),
                    slot,
                ));
            }
            Err(_) => {
                refuse(stream);
                refusals.count(limits.max_connections);
            }
        }
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// The answer to a connection over `http.max_connections`, whole, so it can go out in one
/// write that does not wait.
static TOO_MANY_CONNECTIONS: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let body = serde_json::to_string(&ErrorAnswer {
        error: "too many HTTP connections are open (http.max_connections); try again shortly"
            .into(),
    })
    .unwrap_or_default();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
});

/// Answers 503 and closes, without ever waiting on the client.
fn refuse(stream: TcpStream) {
    // A request already sent and left unread would make the close a reset, which can destroy
    // the 503 before the client reads it: take in what is there, without waiting for more.
    let mut sink = [0u8; 4096];
    for _ in 0..4 {
        if !matches!(stream.try_read(&mut sink), Ok(n) if n > 0) {
            break;
        }
    }
    // A full send buffer only means this client learns of the refusal from the close alone.
    let _ = stream.try_write(&TOO_MANY_CONNECTIONS);
}

#[derive(Default)]
struct Refusals {
    unreported: u64,
    reported_at: Option<Instant>,
}

impl Refusals {
    fn count(&mut self, max_connections: usize) {
        self.unreported += 1;
        if self
            .reported_at
            .is_some_and(|at| at.elapsed() < REFUSALS_REPORTED_EVERY)
        {
            return;
        }
        tracing::warn!(
            refused = self.unreported,
            max_connections,
            "HTTP connections refused: http.max_connections are open; slow and idle clients \
             are closed by http.header_timeout_secs, body_timeout_secs and idle_timeout_secs"
        );
        self.unreported = 0;
        self.reported_at = Some(Instant::now());
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: ConnectionLimits,
    stop: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        stream,
        activity: activity.clone(),
    });
    let app = TowerToHyperService::new(app);
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let timed_out = Arc::new(AtomicBool::new(false));
            let deadline = tokio::time::Instant::now() + limits.body_timeout;
            let mut request = request.map(|body| DeadlineBody {
                body,
                deadline,
                sleep: None,
                timed_out: timed_out.clone(),
            });
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            let handling = Handling::start(&activity);
            let answer = hyper::service::Service::call(&app, request);
            async move {
                let response = answer.await;
                drop(handling);
                // The handler saw the body fail and answered for that; the client should hear
                // why, and the connection must not wait for the rest of that body.
                if timed_out.load(Ordering::Relaxed) {
                    return Ok(body_timed_out(limits));
                }
                response
            }
        })
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut stop_by: Option<tokio::time::Instant> = None;
    loop {
        let idle_check = if activity.is_handling() {
            tokio::time::Instant::now() + limits.idle_timeout
        } else {
            activity.last() + limits.idle_timeout
        };
        let wake_at = stop_by.map_or(idle_check, |by| by.min(idle_check));
        tokio::select! {
            ended = connection.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(%peer, error = %e, "HTTP connection closed");
                }
                return;
            }
            () = stop.cancelled(), if stop_by.is_none() => {
                // Closes the connection now if it is between requests, or after the answer.
                connection.as_mut().graceful_shutdown();
                stop_by = Some(tokio::time::Instant::now() + STOP_GRACE);
            }
            () = tokio::time::sleep_until(wake_at) => {
                let now = tokio::time::Instant::now();
                if stop_by.is_some_and(|by| now >= by) {
                    tracing::debug!(%peer, "HTTP connection closed unfinished: the agent is stopping");
                    return;
                }
                if !activity.is_handling() && now >= activity.last() + limits.idle_timeout {
                    tracing::debug!(%peer, "HTTP connection closed: idle for {:?}", limits.idle_timeout);
                    return;
                }
            }
        }
    }
}

fn body_timed_out(limits: ConnectionLimits) -> Response {
    let answer = ErrorAnswer {
        error: format!(
            "the request body did not arrive within {} s ({}.body_timeout_secs)",
            limits.body_timeout.as_secs(),
            limits.section
        ),
    };
    let mut response = (StatusCode::REQUEST_TIMEOUT, axum::Json(answer)).into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// When a byte last moved on a connection, and whether a handler is working on one of its
/// requests (time the agent takes is not the client's idleness).
struct Activity {
    opened: tokio::time::Instant,
    last_ms: AtomicU64,
    handling: AtomicUsize,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            opened: tokio::time::Instant::now(),
            last_ms: AtomicU64::new(0),
            handling: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> tokio::time::Instant {
        self.opened + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    fn is_handling(&self) -> bool {
        self.handling.load(Ordering::Relaxed) > 0
    }
}

/// A request in the handler's hands; when it is answered the idle clock starts again.
struct Handling(Arc<Activity>);

impl Handling {
    fn start(activity: &Arc<Activity>) -> Handling {
        activity.handling.fetch_add(1, Ordering::Relaxed);
        Handling(activity.clone())
    }
}

impl Drop for Handling {
    fn drop(&mut self) {
        self.0.touch();
        self.0.handling.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The socket, noting each time bytes move either way.
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// A request body that must be complete by a deadline however it trickles: an inactivity
/// timeout would let one byte every few seconds hold the connection for ever.
struct DeadlineBody {
    body: Incoming,
    deadline: tokio::time::Instant,
    /// Made on the first wait only: most bodies are in hand when the handler asks.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    timed_out: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time (http.body_timeout_secs)")]
struct BodyTimedOut;

impl hyper::body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.timed_out.load(Ordering::Relaxed) {
            return Poll::Ready(Some(Err(Box::new(BodyTimedOut))));
        }
        // What has arrived is taken even at the deadline.
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(BoxError::from)));
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        ready!(sleep.as_mut().poll(cx));
        this.timed_out.store(true, Ordering::Relaxed);
        Poll::Ready(Some(Err(Box::new(BodyTimedOut))))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
