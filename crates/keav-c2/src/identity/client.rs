//! A small typed client of the identity service (plain HTTP/1.1, one connection per call,
//! answers read up to 64 KiB, every call bounded by a timeout).
//!
//! Devices use [`Client::register`]; operator tools use [`Client::with_operator_token`] and
//! the operator calls.
//!
//! [`Client::register`] checks the C2 server key it is given against the pin of the
//! enrollment token (`<secret>.<pin>`, see [`super::token`]) and fails with
//! [`IdentityError::ServerKeyMismatch`] if it differs. A token of the old format (no pin) is
//! still accepted, with a logged warning: the server key is then trusted on first use.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use zeroize::{Zeroize, Zeroizing};

use super::api::{
    ChallengeBody, DeviceBody, DevicesBody, EnrollmentBody, EnrollmentRequestBody, ErrorBody,
    RegisterBody, RegisteredBody,
};
use super::token::EnrollmentToken;
use super::{registration_message, BrokerPassword, IdentityError, NONCE_LEN};
use crate::keys::{Alg, DeviceId, PublicKey, SigningKey};
use crate::topics::Topics;

/// Largest answer the client reads.
const MAX_ANSWER: usize = 64 * 1024;

/// What a device receives when it registers.
#[derive(Debug, Clone)]
pub struct Registration {
    /// Its id ([`DeviceId::of_key`] of its key; checked by the client).
    pub device_id: DeviceId,
    /// Its MQTT user name.
    pub broker_username: String,
    /// Its MQTT password.
    pub broker_password: BrokerPassword,
    /// The broker's `host:port`.
    pub broker: String,
    /// The C2 server's id (checked against its key).
    pub server_id: DeviceId,
    /// The C2 server's public key.
    pub server_key: PublicKey,
    /// The device's topics (checked against the topic scheme).
    pub topics: Topics,
}

/// A challenge: the nonce to sign, and how long it stays valid.
#[derive(Debug, Clone, Copy)]
pub struct Challenge {
    /// The nonce.
    pub nonce: [u8; NONCE_LEN],
    /// Seconds it stays valid.
    pub expires_in: u64,
}

/// A client of one identity service.
#[derive(Clone)]
pub struct Client {
    authority: String,
    operator_token: Option<Zeroizing<String>>,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("authority", &self.authority)
            .field("operator", &self.operator_token.is_some())
            .finish()
    }
}

impl Client {
    /// A client of the service at `http://host:port` (or plain `host:port`).
    pub fn new(address: &str) -> Result<Client, IdentityError> {
        let rest = match address.split_once("://") {
            Some(("http", rest)) => rest,
            Some(_) => return Err(IdentityError::BadAddress),
            None => address,
        };
        let authority = rest.trim_end_matches('/');
        let valid = !authority.is_empty()
            && !authority.contains(['/', '@', '?', '#', ' '])
            && authority
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !valid {
            return Err(IdentityError::BadAddress);
        }
        Ok(Client {
            authority: authority.to_string(),
            operator_token: None,
            timeout: Duration::from_secs(30),
        })
    }

    /// The same client, sending `token` as the operator's bearer token.
    pub fn with_operator_token(mut self, token: Zeroizing<String>) -> Client {
        self.operator_token = Some(token);
        self
    }

    /// The same client with another per-call timeout (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// One exchange: status and body (at most 64 KiB).
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), IdentityError> {
        let call = async {
            let stream = TcpStream::connect(&self.authority).await?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            let conn = tokio::spawn(conn);
            let mut req = Request::builder()
                .method(method)
                .uri(path)
                .header(header::HOST, &self.authority)
                .header(header::CONTENT_TYPE, "application/json");
            if let Some(t) = &self.operator_token {
                req = req.header(header::AUTHORIZATION, format!("Bearer {}", t.as_str()));
            }
            let req = req
                .body(Full::new(Bytes::from(body)))
                .map_err(|_| IdentityError::BadAddress)?;
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|_| IdentityError::BadAnswer("answer too large or cut"))?
                .to_bytes();
            drop(sender);
            conn.abort();
            Ok::<_, IdentityError>((status, bytes))
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| IdentityError::Timeout)?
    }

    /// Sends a call and reads a `want` answer as `T` (or the service's error).
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        want: StatusCode,
    ) -> Result<T, IdentityError> {
        let (status, bytes) = self.exchange(method, path, body).await?;
        if status != want {
            let code = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.code)
                .unwrap_or_default();
            return Err(IdentityError::Refused {
                status: status.as_u16(),
                code,
            });
        }
        let mut owned = Zeroizing::new(bytes.to_vec());
        let parsed =
            serde_json::from_slice(&owned).map_err(|_| IdentityError::BadAnswer("malformed JSON"));
        owned.zeroize();
        parsed
    }

    /// Asks for a challenge nonce.
    pub async fn challenge(&self) -> Result<Challenge, IdentityError> {
        let c: ChallengeBody = self
            .call(Method::POST, "/v1/challenge", Vec::new(), StatusCode::OK)
            .await?;
        let nonce = STANDARD
            .decode(c.nonce.as_bytes())
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or(IdentityError::BadAnswer("nonce"))?;
        Ok(Challenge {
            nonce,
            expires_in: c.expires_in,
        })
    }

    /// Registers `key` with `enrollment_token`: asks for a challenge, proves possession of
    /// the key, and checks the answer (id, server id and topics consistent, and the server
    /// key the token pins, if it pins one).
    ///
    /// Fails with [`IdentityError::BadEnrollmentToken`] (before any call) if the token's pin
    /// is malformed, and with [`IdentityError::ServerKeyMismatch`] if the service answers
    /// with another server key than the pinned one.
    pub async fn register(
        &self,
        key: &SigningKey,
        enrollment_token: &str,
    ) -> Result<Registration, IdentityError> {
        let token = EnrollmentToken::new(Zeroizing::new(enrollment_token.to_string()));
        let pin = token.pin()?;
        if pin.is_none() {
            tracing::warn!(
                "enrollment token without a server-key pin (old format): the C2 server key \
                 the identity service answers with is trusted unchecked"
            );
        }
        let challenge = self.challenge().await?;
        let public = key.public();
        let pk = public.to_bytes();
        let signature = key.sign(&registration_message(&challenge.nonce, key.alg(), &pk))?;
        let body = RegisterBody {
            alg: key.alg().name().to_string(),
            public_key: STANDARD.encode(&pk),
            enrollment_token: token.secret().to_string(),
            nonce: STANDARD.encode(challenge.nonce),
            signature: STANDARD.encode(&signature),
        };
        let json = Zeroizing::new(
            serde_json::to_vec(&body).map_err(|_| IdentityError::BadAnswer("encode"))?,
        );
        let mut r: RegisteredBody = self
            .call(
                Method::POST,
                "/v1/register",
                json.to_vec(),
                StatusCode::CREATED,
            )
            .await?;
        let password = BrokerPassword::new(Zeroizing::new(std::mem::take(&mut r.broker_password)));
        let device_id = DeviceId::of_key(&public);
        if r.device_id != device_id.to_hex() || r.broker_username != device_id.to_hex() {
            return Err(IdentityError::BadAnswer("device id is not the key's"));
        }
        let server_alg =
            Alg::from_name(&r.server_alg).ok_or(IdentityError::BadAnswer("server algorithm"))?;
        let server_key = STANDARD
            .decode(r.server_public_key.as_bytes())
            .ok()
            .and_then(|b| PublicKey::from_bytes(server_alg, &b).ok())
            .ok_or(IdentityError::BadAnswer("server key"))?;
        if let Some(pin) = pin {
            if !pin.matches(&server_key) {
                tracing::error!(
                    "identity service answered with a C2 server key the enrollment token does \
                     not pin"
                );
                return Err(IdentityError::ServerKeyMismatch);
            }
        }
        let server_id = DeviceId::of_key(&server_key);
        if r.server_id != server_id.to_hex() {
            return Err(IdentityError::BadAnswer("server id is not its key's"));
        }
        let topics = Topics::new(server_id);
        if r.topics.subscribe != topics.to_device(device_id)
            || r.topics.publish != topics.to_server(device_id)
        {
            return Err(IdentityError::BadAnswer("topics"));
        }
        Ok(Registration {
            device_id,
            broker_username: std::mem::take(&mut r.broker_username),
            broker_password: password,
            broker: std::mem::take(&mut r.broker),
            server_id,
            server_key,
            topics,
        })
    }

    /// Operator: issues a one-time enrollment token. Returns the token (`<secret>.<pin>`,
    /// to hand to the device as it is) and its expiry.
    pub async fn create_enrollment(
        &self,
        request: &EnrollmentRequestBody,
    ) -> Result<(EnrollmentToken, u64), IdentityError> {
        let body = serde_json::to_vec(request).map_err(|_| IdentityError::BadAnswer("encode"))?;
        let mut e: EnrollmentBody = self
            .call(Method::POST, "/v1/enrollments", body, StatusCode::CREATED)
            .await?;
        Ok((
            EnrollmentToken::new(Zeroizing::new(std::mem::take(&mut e.token))),
            e.expires,
        ))
    }

    /// Operator: every device.
    pub async fn devices(&self) -> Result<Vec<DeviceBody>, IdentityError> {
        let d: DevicesBody = self
            .call(Method::GET, "/v1/devices", Vec::new(), StatusCode::OK)
            .await?;
        Ok(d.devices)
    }

    /// Operator: one device.
    pub async fn device(&self, id: DeviceId) -> Result<DeviceBody, IdentityError> {
        self.call(
            Method::GET,
            &format!("/v1/devices/{id}"),
            Vec::new(),
            StatusCode::OK,
        )
        .await
    }

    /// Operator: revokes a device (its broker account goes too).
    pub async fn revoke(&self, id: DeviceId) -> Result<DeviceBody, IdentityError> {
        self.call(
            Method::POST,
            &format!("/v1/devices/{id}/revoke"),
            Vec::new(),
            StatusCode::OK,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert!(Client::new("http://127.0.0.1:8080").is_ok());
        assert!(Client::new("127.0.0.1:8080/").is_ok());
        assert!(Client::new("https://127.0.0.1:8080").is_err());
        assert!(Client::new("127.0.0.1").is_err());
        assert!(Client::new("http://u@h:1").is_err());
        assert!(Client::new("http://h:1/x").is_err());
    }
}
