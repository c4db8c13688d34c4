//! The JSON bodies of the C2 server's operator routes (`/v1/c2/...`). Tokens are lower-case
//! hex; device ids 16 hex digits; binary values standard base64.

use serde::{Deserialize, Serialize};

/// A typed data value (`{"u64": 5}`, `{"text": "hi"}`, `{"bytes": "<base64>"}`...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueBody {
    /// Unsigned 64-bit.
    U64(u64),
    /// Signed 64-bit.
    I64(i64),
    /// 64-bit float.
    F64(f64),
    /// Boolean.
    Bool(bool),
    /// UTF-8 text.
    Text(String),
    /// Bytes (base64).
    Bytes(String),
}

/// What to send: exactly one of `action`, `data_id` (with `value`), `generic`, `id_request`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandBody {
    /// One device (hex id) …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// … or a group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// An action id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<u16>,
    /// The action's arguments (base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<String>,
    /// A data id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_id: Option<String>,
    /// The data's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<ValueBody>,
    /// Generic bytes (base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generic: Option<String>,
    /// An ID request.
    #[serde(default)]
    pub id_request: bool,
    /// Lifetime of the command in seconds (default: the server's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<u64>,
    /// Seal the data in each device's confidential session (data only; devices without an
    /// established session are skipped).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub confidential: bool,
}

/// One message sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SentItem {
    /// To whom.
    pub device: String,
    /// Its token (hex).
    pub token: String,
}

/// A device left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkippedItem {
    /// The device.
    pub device: String,
    /// Why.
    pub reason: String,
}

/// The answer to a command, an update or a group command.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SentBody {
    /// Messages sent.
    pub sent: Vec<SentItem>,
    /// Devices left out.
    pub skipped: Vec<SkippedItem>,
}

/// `POST /v1/c2/update`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateBody {
    /// One device …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// … or a group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Where the devices download the update (http://).
    pub url: String,
    /// Its SHA-256 (64 hex digits).
    pub digest: String,
}

/// `POST /v1/c2/activate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivateBody {
    /// The device.
    pub device: String,
    /// The update's token (hex).
    pub token: String,
}

/// One device's recorded response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordedBody {
    /// The device.
    pub device: String,
    /// Status code.
    pub status: u8,
    /// Status name.
    pub status_name: String,
}

/// Where a token stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBody {
    /// The token (hex).
    pub token: String,
    /// `pending`, `answered`, `expired` or `unknown` (not tracked by this server run).
    pub outcome: String,
    /// Responses recorded in the registry under the token.
    pub responses: Vec<RecordedBody>,
}

/// `POST /v1/c2/responses`: several tokens at once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensBody {
    /// Tokens (hex), at most 10,000.
    pub tokens: Vec<String>,
}

/// Its answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenListBody {
    /// One per token asked, same order.
    pub tokens: Vec<TokenBody>,
}

/// A pending join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinBody {
    /// The device.
    pub device: String,
    /// `simple`, `human`, `observed` or `command`.
    pub method: String,
    /// The words the device shows (human-moderated joins).
    pub words: Option<Vec<String>>,
}

/// `GET /v1/c2/joins`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinsBody {
    /// Pending joins.
    pub joins: Vec<JoinBody>,
}

/// `POST /v1/c2/joins/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecideBody {
    /// Accept or refuse.
    pub accept: bool,
    /// For a human-moderated join: the words the operator read on the device.
    #[serde(default)]
    pub words: Vec<String>,
}

/// The decision's outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecidedBody {
    /// Whether the device joined.
    pub joined: bool,
    /// Why not.
    pub reason: Option<String>,
}

/// Counters of the server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsBody {
    /// Messages accepted.
    pub accepted: u64,
    /// Messages dropped, by reason.
    pub dropped: Vec<(String, u64)>,
    /// Payloads dropped for their size before parsing.
    pub oversized: u64,
    /// Counters of the confidential layer, by name.
    #[serde(default)]
    pub confidential: Vec<(String, u64)>,
}

/// `POST /v1/c2/devices/{id}/confidential` (the body is optional).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfidentialBody {
    /// Start a session (or rekey the current one); default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<bool>,
    /// Require confidentiality for the device (or stop requiring it); unchanged if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required: Option<bool>,
}

/// `GET /v1/c2/devices/{id}/confidential`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfidentialInfoBody {
    /// The device.
    pub device: String,
    /// Whether the operator requires confidentiality.
    pub required: bool,
    /// Whether a session is established.
    pub established: bool,
    /// Whether a handshake is in progress.
    pub handshaking: bool,
    /// The session id (hex).
    pub session: Option<String>,
    /// Sessions completed with the device.
    pub sessions: u64,
    /// Records sealed in the current session.
    pub records_sealed: u64,
    /// Records opened in the current session.
    pub records_opened: u64,
}
