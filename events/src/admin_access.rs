//! Who may use an admin API: the layer that asks each request for the bearer token its route
//! needs ([`AdminRight::Read`] or [`AdminRight::Write`]) under the service's [`AdminAccess`],
//! and answers the ones without it in words that say which token to send.

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::admin::ErrorAnswer;
use crate::config::{AdminAccess, AdminRefusal, AdminRight};

/// Requires `right` on every route of `routes` (routes merged into it later are not covered).
pub fn require<S>(routes: Router<S>, access: Arc<AdminAccess>, right: AdminRight) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    routes.route_layer(axum::middleware::from_fn(
        move |request: Request, next: Next| {
            let access = access.clone();
            async move {
                let bearer = request
                    .headers()
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "));
                match access.allows(right, bearer) {
                    Ok(()) => next.run(request).await,
                    Err(refusal) => refused(refusal),
                }
            }
        },
    ))
}

fn refused(refusal: AdminRefusal) -> Response {
    match refusal {
        AdminRefusal::Unauthenticated => {
            let answer = ErrorAnswer {
                error: "the admin API needs a bearer token: send `Authorization: Bearer <token>` \
                        with the service's admin.read_token or admin.write_token (the operator \
                        commands take --token-file FILE or BACKHAUL_ADMIN_TOKEN)"
                    .into(),
            };
            let mut response = (StatusCode::UNAUTHORIZED, axum::Json(answer)).into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
        AdminRefusal::ReadOnly => {
            let answer = ErrorAnswer {
                error: "this token may only read: changes (dead-letter replay and discard) need \
                        the service's admin.write_token"
                    .into(),
            };
            (StatusCode::FORBIDDEN, axum::Json(answer)).into_response()
        }
    }
}
