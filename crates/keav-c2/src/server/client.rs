//! A small client of the server's operator routes ([`super::http`]), for the CLI and tests:
//! plain HTTP/1.1, one connection per call, answers read up to 4 MiB, every call bounded by
//! a timeout.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{header, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpStream;
use zeroize::Zeroizing;

use super::api::*;
use crate::identity::api::ErrorBody;
use crate::identity::IdentityError;

const MAX_ANSWER: usize = 4 * 1024 * 1024;

/// An operator client of one C2 server.
#[derive(Clone)]
pub struct OperatorClient {
    authority: String,
    token: Zeroizing<String>,
    timeout: Duration,
}

impl std::fmt::Debug for OperatorClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorClient")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl OperatorClient {
    /// A client of the server at `http://host:port` (or `host:port`) with the operator token.
    pub fn new(address: &str, token: Zeroizing<String>) -> Result<OperatorClient, IdentityError> {
        // The identity client validates the address the same way.
        crate::identity::Client::new(address)?;
        let rest = address.split_once("://").map_or(address, |(_, r)| r);
        Ok(OperatorClient {
            authority: rest.trim_end_matches('/').to_string(),
            token,
            timeout: Duration::from_secs(30),
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, IdentityError> {
        let call = async {
            let stream = TcpStream::connect(&self.authority).await?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            let conn = tokio::spawn(conn);
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header(header::HOST, &self.authority)
                .header(header::CONTENT_TYPE, "application/json")
                .header(
                    header::AUTHORIZATION,
                    format!("Bearer {}", self.token.as_str()),
                )
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|_| IdentityError::BadAddress)?;
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|_| IdentityError::BadAnswer("answer too large or cut"))?
                .to_bytes();
            conn.abort();
            Ok::<_, IdentityError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| IdentityError::Timeout)??;
        if status != StatusCode::OK {
            let code = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| format!("{} ({})", e.code, e.error))
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(IdentityError::Refused {
                status: status.as_u16(),
                code,
            });
        }
        serde_json::from_slice(&bytes).map_err(|_| IdentityError::BadAnswer("malformed JSON"))
    }

    fn json<B: Serialize>(b: &B) -> Result<Option<Vec<u8>>, IdentityError> {
        serde_json::to_vec(b)
            .map(Some)
            .map_err(|_| IdentityError::BadAnswer("encode"))
    }

    /// Sends a command to a device or a group.
    pub async fn command(&self, c: &CommandBody) -> Result<SentBody, IdentityError> {
        self.call(Method::POST, "/v1/c2/command", Self::json(c)?)
            .await
    }

    /// Starts an update.
    pub async fn update(&self, u: &UpdateBody) -> Result<SentBody, IdentityError> {
        self.call(Method::POST, "/v1/c2/update", Self::json(u)?)
            .await
    }

    /// Activates a verified update.
    pub async fn activate(&self, a: &ActivateBody) -> Result<SentBody, IdentityError> {
        self.call(Method::POST, "/v1/c2/activate", Self::json(a)?)
            .await
    }

    /// Where tokens stand.
    pub async fn responses(&self, tokens: &[String]) -> Result<Vec<TokenBody>, IdentityError> {
        let b = TokensBody {
            tokens: tokens.to_vec(),
        };
        let l: TokenListBody = self
            .call(Method::POST, "/v1/c2/responses", Self::json(&b)?)
            .await?;
        Ok(l.tokens)
    }

    /// Pending joins.
    pub async fn joins(&self) -> Result<Vec<JoinBody>, IdentityError> {
        let j: JoinsBody = self.call(Method::GET, "/v1/c2/joins", None).await?;
        Ok(j.joins)
    }

    /// Decides a pending join.
    pub async fn decide(&self, device: &str, d: &DecideBody) -> Result<DecidedBody, IdentityError> {
        self.call(
            Method::POST,
            &format!("/v1/c2/joins/{device}"),
            Self::json(d)?,
        )
        .await
    }

    /// `join`, `terminate`, `deregister` or `revoke` a device.
    pub async fn device_verb(&self, device: &str, verb: &str) -> Result<SentBody, IdentityError> {
        self.call(
            Method::POST,
            &format!("/v1/c2/devices/{device}/{verb}"),
            None,
        )
        .await
    }

    /// Starts (or rekeys) a confidential session with `device` and/or sets its policy.
    pub async fn confidential(
        &self,
        device: &str,
        b: &ConfidentialBody,
    ) -> Result<SentBody, IdentityError> {
        self.call(
            Method::POST,
            &format!("/v1/c2/devices/{device}/confidential"),
            Self::json(b)?,
        )
        .await
    }

    /// Where `device`'s confidentiality stands.
    pub async fn confidential_info(
        &self,
        device: &str,
    ) -> Result<ConfidentialInfoBody, IdentityError> {
        self.call(
            Method::GET,
            &format!("/v1/c2/devices/{device}/confidential"),
            None,
        )
        .await
    }

    /// The server's counters.
    pub async fn stats(&self) -> Result<StatsBody, IdentityError> {
        self.call(Method::GET, "/v1/c2/stats", None).await
    }
}
