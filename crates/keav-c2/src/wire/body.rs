//! The type-specific bodies: one struct and one [`BodyCodec`] pair per message type.
//!
//! A body travels length-prefixed inside the message, and its decoder must consume exactly
//! those bytes ([`WireError::TrailingBytes`] otherwise). Inside a body every variable field
//! has its own explicit length too. Who sends what to whom, and how the bodies chain into
//! flows (update, joins, deregistration), is in docs/C2.md.

use super::reader::{put_vec16, put_vec8, Reader};
use super::words::{JoinCode, MAX_JOIN_CODE_LEN};
use super::{MessageType, WireError};
use crate::keys::DeviceId;

/// Longest update URL, in bytes.
pub const MAX_URL_LEN: usize = 2048;
/// Longest data id, in bytes.
pub const MAX_DATA_ID_LEN: usize = 64;
/// Longest opaque payload (generic data, action arguments, data bytes or text), in bytes.
pub const MAX_PAYLOAD_LEN: usize = 60 * 1024;

/// One wire type's body codec.
pub trait BodyCodec: Sized {
    /// The message type this body belongs to.
    const TYPE: MessageType;

    /// Appends the body's bytes (without its length prefix), or [`WireError::BadField`] if a
    /// field is out of its bounds.
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError>;

    /// Reads the body's fields from `r` (the caller checks that nothing is left over).
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError>;
}

fn utf8(bytes: &[u8], field: &'static str) -> Result<String, WireError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| WireError::BadField(field))
}

fn put_code(out: &mut Vec<u8>, code: &JoinCode) -> Result<(), WireError> {
    put_vec8(out, code.as_bytes(), MAX_JOIN_CODE_LEN, "join code")
}

fn read_code(r: &mut Reader<'_>) -> Result<JoinCode, WireError> {
    JoinCode::from_bytes(r.vec8()?).ok_or(WireError::BadField("join code"))
}

/// Generic: opaque application bytes (at most [`MAX_PAYLOAD_LEN`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generic {
    /// The bytes.
    pub data: Vec<u8>,
}

impl BodyCodec for Generic {
    const TYPE: MessageType = MessageType::Generic;
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        put_vec16(out, &self.data, MAX_PAYLOAD_LEN, "generic data")
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(Generic {
            data: r.vec16()?.to_vec(),
        })
    }
}

/// Initiate (server → device): fetch the update at `url` over HTTP and check that its
/// SHA-256 is `digest`; the device answers with a [`Response`] carrying the header's token
/// and waits for [`Activate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initiate {
    /// Where to download the update (UTF-8, at most [`MAX_URL_LEN`] bytes).
    pub url: String,
    /// SHA-256 of the update file.
    pub digest: [u8; 32],
}

impl BodyCodec for Initiate {
    const TYPE: MessageType = MessageType::Initiate;
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        put_vec16(out, self.url.as_bytes(), MAX_URL_LEN, "url")?;
        out.extend_from_slice(&self.digest);
        Ok(())
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let url = r.vec16()?;
        if url.len() > MAX_URL_LEN {
            return Err(WireError::BadField("url"));
        }
        Ok(Initiate {
            url: utf8(url, "url")?,
            digest: r.array()?,
        })
    }
}

/// The outcome a [`Response`] reports.
///
/// Unknown codes are kept as [`Status::Other`] (so a newer peer's response can still be
/// matched by its token and logged) rather than refused. Two statuses are equal when their
/// codes are: `Status::Other(0x01) == Status::UpdateSuccess`.
#[derive(Debug, Clone, Copy)]
pub enum Status {
    /// The update was downloaded and its digest matched.
    UpdateSuccess,
    /// The update server could not be reached.
    UpdateFailServer,
    /// The update server answered with an HTTP error.
    UpdateFailHttp,
    /// The file could not be fetched or stored (too large, cut short, disk).
    UpdateFailFile,
    /// The file's SHA-256 differs from the initiate message's digest.
    UpdateFailDigest,
    /// The update was activated.
    ActivateSuccess,
    /// Activation failed (no verified update for this token, or the installer failed).
    ActivateFail,
    /// The action ran.
    ActionSuccess,
    /// The device has no handler for this action id.
    ActionUnknown,
    /// The action's handler failed.
    ActionFail,
    /// The data was accepted.
    DataSuccess,
    /// The device does not know this data id or type.
    DataTypeUnknown,
    /// The join was accepted.
    JoinOk,
    /// The join was refused (operator or policy).
    JoinRefused,
    /// The join failed (timeout, wrong code, internal error).
    JoinFail,
    /// The observer saw the expected code.
    ObservedJoinValid,
    /// The observer saw another code.
    ObservedJoinInvalid,
    /// The observer could not observe the device.
    ObservedJoinFail,
    /// The resignation was taken.
    ResignOk,
    /// The device is terminating.
    TerminateOk,
    /// The deregistration was done.
    DeregisterOk,
    /// The device answers an ID request (the signature is the proof).
    Identified,
    /// A code this version does not know.
    Other(u8),
}

const STATUS_CODES: [(Status, u8); 22] = [
    (Status::UpdateSuccess, 0x01),
    (Status::UpdateFailServer, 0x02),
    (Status::UpdateFailHttp, 0x03),
    (Status::UpdateFailFile, 0x04),
    (Status::UpdateFailDigest, 0x05),
    (Status::ActivateSuccess, 0x10),
    (Status::ActivateFail, 0x11),
    (Status::ActionSuccess, 0x20),
    (Status::ActionUnknown, 0x21),
    (Status::ActionFail, 0x22),
    (Status::DataSuccess, 0x30),
    (Status::DataTypeUnknown, 0x31),
    (Status::JoinOk, 0x40),
    (Status::JoinRefused, 0x41),
    (Status::JoinFail, 0x42),
    (Status::ObservedJoinValid, 0x50),
    (Status::ObservedJoinInvalid, 0x51),
    (Status::ObservedJoinFail, 0x52),
    (Status::ResignOk, 0x60),
    (Status::TerminateOk, 0x61),
    (Status::DeregisterOk, 0x62),
    (Status::Identified, 0x70),
];

impl Status {
    /// The one-byte wire code.
    pub fn code(self) -> u8 {
        if let Status::Other(c) = self {
            return c;
        }
        STATUS_CODES
            .iter()
            .find(|(s, _)| std::mem::discriminant(s) == std::mem::discriminant(&self))
            .map_or(0, |(_, c)| *c)
    }

    /// The status of a wire code ([`Status::Other`] if unknown).
    pub fn from_code(code: u8) -> Status {
        STATUS_CODES
            .iter()
            .find(|(_, c)| *c == code)
            .map_or(Status::Other(code), |(s, _)| *s)
    }

    /// Whether the status reports success.
    pub fn is_success(self) -> bool {
        matches!(
            Status::from_code(self.code()),
            Status::UpdateSuccess
                | Status::ActivateSuccess
                | Status::ActionSuccess
                | Status::DataSuccess
                | Status::JoinOk
                | Status::ObservedJoinValid
                | Status::ResignOk
                | Status::TerminateOk
                | Status::DeregisterOk
                | Status::Identified
        )
    }
}

impl PartialEq for Status {
    fn eq(&self, other: &Status) -> bool {
        self.code() == other.code()
    }
}

impl Eq for Status {}

/// Response: the outcome of the command whose token the header repeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The outcome.
    pub status: Status,
}

impl BodyCodec for Response {
    const TYPE: MessageType = MessageType::Response;
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        out.push(self.status.code());
        Ok(())
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(Response {
            status: Status::from_code(r.u8()?),
        })
    }
}

/// Activate (server → device): install the update that the [`Initiate`] with the same token
/// announced; `digest` repeats its digest so a device never activates another file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activate {
    /// SHA-256 of the update to activate.
    pub digest: [u8; 32],
}

impl BodyCodec for Activate {
    const TYPE: MessageType = MessageType::Activate;
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        out.extend_from_slice(&self.digest);
        Ok(())
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(Activate { digest: r.array()? })
    }
}

/// Action (server → device): run action `action` with opaque arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    /// The action's id (the device's handler table decides what it means).
    pub action: u16,
    /// Arguments (at most [`MAX_PAYLOAD_LEN`] bytes).
    pub args: Vec<u8>,
}

impl BodyCodec for Action {
    const TYPE: MessageType = MessageType::Action;
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        out.extend_from_slice(&self.action.to_be_bytes());
        put_vec16(out, &self.args, MAX_PAYLOAD_LEN, "action args")
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(Action {
            action: r.u16()?,
            args: r.vec16()?.to_vec(),
        })
    }
}

/// A typed value carried by [`Data`]. Each kind is a one-byte tag and a fixed-size
/// big-endian value, or a two-byte length and the bytes.
///
/// Floats compare by their bits (so `NaN == NaN` when the bits are the same, and a value
/// always equals its decoded copy).
#[derive(Debug, Clone)]
pub enum Value {
    /// Tag 1.
    U8(u8),
    /// Tag 2.
    U16(u16),
    /// Tag 3.
    U32(u32),
    /// Tag 4.
    U64(u64),
    /// Tag 5.
    I32(i32),
    /// Tag 6.
    I64(i64),
    /// Tag 7 (IEEE 754 binary32).
    F32(f32),
    /// Tag 8 (IEEE 754 binary64).
    F64(f64),
    /// Tag 9: one byte, 0 or 1 (anything else is refused).
    Bool(bool),
    /// Tag 10: at most [`MAX_PAYLOAD_LEN`] bytes.
    Bytes(Vec<u8>),
    /// Tag 11: UTF-8, at most [`MAX_PAYLOAD_LEN`] bytes.
    Text(String),
}

impl PartialEq for Value {
    fn eq(&self, other: &Value) -> bool {
        use Value::*;
        match (self, other) {
            (U8(a), U8(b)) => a == b,
            (U16(a), U16(b)) => a == b,
            (U32(a), U32(b)) => a == b,
            (U64(a), U64(b)) => a == b,
            (I32(a), I32(b)) => a == b,
            (I64(a), I64(b)) => a == b,
            (F32(a), F32(b)) => a.to_bits() == b.to_bits(),
            (F64(a), F64(b)) => a.to_bits() == b.to_bits(),
            (Bool(a), Bool(b)) => a == b,
            (Bytes(a), Bytes(b)) => a == b,
            (Text(a), Text(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Value {}

impl Value {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        match self {
            Value::U8(v) => out.extend_from_slice(&[1, *v]),
            Value::U16(v) => {
                out.push(2);
                out.extend_from_slice(&v.to_be_bytes());
            }
            Value::U32(v) => {
                out.push(3);
                out.extend_from_slice(&v.to_be_bytes());
            }
            Value::U64(v) => {
                out.push(4);
                out.extend_from_slice(&v.to_be_bytes());
            }
            Value::I32(v) => {
                out.push(5);
                out.extend_from_slice(&v.to_be_bytes());
            }
            Value::I64(v) => {
                out.push(6);
                out.extend_from_slice(&v.to_be_bytes());
            }
            Value::F32(v) => {
                out.push(7);
                out.extend_from_slice(&v.to_bits().to_be_bytes());
            }
            Value::F64(v) => {
                out.push(8);
                out.extend_from_slice(&v.to_bits().to_be_bytes());
            }
            Value::Bool(v) => out.extend_from_slice(&[9, u8::from(*v)]),
            Value::Bytes(v) => {
                out.push(10);
                put_vec16(out, v, MAX_PAYLOAD_LEN, "data bytes")?;
            }
            Value::Text(v) => {
                out.push(11);
                put_vec16(out, v.as_bytes(), MAX_PAYLOAD_LEN, "data text")?;
            }
        }
        Ok(())
    }

    fn decode(r: &mut Reader<'_>) -> Result<Value, WireError> {
        Ok(match r.u8()? {
            1 => Value::U8(r.u8()?),
            2 => Value::U16(r.u16()?),
            3 => Value::U32(r.u32()?),
            4 => Value::U64(r.u64()?),
            5 => Value::I32(i32::from_be_bytes(r.array()?)),
            6 => Value::I64(i64::from_be_bytes(r.array()?)),
            7 => Value::F32(f32::from_bits(r.u32()?)),
            8 => Value::F64(f64::from_bits(r.u64()?)),
            9 => match r.u8()? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                _ => return Err(WireError::BadField("data bool")),
            },
            10 => Value::Bytes(r.vec16()?.to_vec()),
            11 => Value::Text(utf8(r.vec16()?, "data text")?),
            _ => return Err(WireError::BadField("data type")),
        })
    }
}

/// Data (either direction): a named, typed value (a reading, a setting).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Data {
    /// What the value is (UTF-8, at most [`MAX_DATA_ID_LEN`] bytes), e.g. `"temperature"`.
    pub id: String,
    /// The value.
    pub value: Value,
}

impl BodyCodec for Data {
    const TYPE: MessageType = MessageType::Data;
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        put_vec8(out, self.id.as_bytes(), MAX_DATA_ID_LEN, "data id")?;
        self.value.encode(out)
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let id = r.vec8()?;
        if id.len() > MAX_DATA_ID_LEN {
            return Err(WireError::BadField("data id"));
        }
        Ok(Data {
            id: utf8(id, "data id")?,
            value: Value::decode(r)?,
        })
    }
}

macro_rules! empty_body {
    ($(#[$doc:meta])* $name:ident, $ty:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub struct $name;

        impl BodyCodec for $name {
            const TYPE: MessageType = MessageType::$ty;
            fn encode(&self, _out: &mut Vec<u8>) -> Result<(), WireError> {
                Ok(())
            }
            fn decode(_r: &mut Reader<'_>) -> Result<Self, WireError> {
                Ok($name)
            }
        }
    };
}

empty_body!(
    /// ID request (server → device): prove you are there and hold your key; the device
    /// answers with a [`Response`] ([`Status::Identified`]) that repeats the (fresh, random)
    /// token, so the signature over it is the proof.
    IdRequest,
    IdRequest
);
empty_body!(
    /// Join request (device → server): a registered device asks to join the server's fleet;
    /// the server answers with a [`Response`] ([`Status::JoinOk`] or [`Status::JoinRefused`]).
    JoinRequest,
    JoinRequest
);
empty_body!(
    /// Join command (server → device): the server adds a registered device to its fleet on
    /// its own initiative; the device answers with a [`Response`].
    JoinCommand,
    JoinCommand
);
empty_body!(
    /// Human-moderated join request (device → server). Carries nothing secret: the server
    /// answers with a [`HumanJoinResponse`] holding a fresh [`JoinCode`], and an operator
    /// accepts or rejects after comparing the words on the device with the console's.
    HumanJoinRequest,
    HumanJoinRequest
);
empty_body!(
    /// Resign (device → server): the device leaves the fleet (it keeps its identity).
    Resign,
    Resign
);
empty_body!(
    /// Terminate (server → device): stop taking commands from this server and leave the fleet.
    Terminate,
    Terminate
);
empty_body!(
    /// Deregister request (device → server): revoke my identity.
    DeregisterRequest,
    DeregisterRequest
);
empty_body!(
    /// Deregister command (server → device): your identity is revoked (broker access goes
    /// with it); erase the keys that belong to it.
    DeregisterCommand,
    DeregisterCommand
);

/// Human-moderated join response (server → device): show `code` as words
/// ([`JoinCode::words`]); the operator sees the same words on the console. The outcome
/// follows as a [`Response`] ([`Status::JoinOk`], [`Status::JoinRefused`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HumanJoinResponse {
    /// The code to show.
    pub code: JoinCode,
}

impl BodyCodec for HumanJoinResponse {
    const TYPE: MessageType = MessageType::HumanJoinResponse;
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        put_code(out, &self.code)
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(HumanJoinResponse {
            code: read_code(r)?,
        })
    }
}

/// Observed join request (device → server): join, vouched for by `observer`, a device that
/// is already in the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedJoinRequest {
    /// The device that will observe the joining one.
    pub observer: DeviceId,
}

impl BodyCodec for ObservedJoinRequest {
    const TYPE: MessageType = MessageType::ObservedJoinRequest;
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        out.extend_from_slice(&self.observer.0);
        Ok(())
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(ObservedJoinRequest {
            observer: DeviceId(r.array()?),
        })
    }
}

/// Observed join response (server → joining device): present `code` to the observer
/// (display, QR code, short-range radio). The outcome follows as a [`Response`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedJoinResponse {
    /// The code to present.
    pub code: JoinCode,
}

impl BodyCodec for ObservedJoinResponse {
    const TYPE: MessageType = MessageType::ObservedJoinResponse;
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        put_code(out, &self.code)
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(ObservedJoinResponse {
            code: read_code(r)?,
        })
    }
}

/// Observation request (server → observer): observe device `joining` and confirm that it
/// presents `code`; the observer answers with a [`Response`] ([`Status::ObservedJoinValid`],
/// [`Status::ObservedJoinInvalid`] or [`Status::ObservedJoinFail`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservationRequest {
    /// The device asking to join.
    pub joining: DeviceId,
    /// The code it was given.
    pub code: JoinCode,
}

impl BodyCodec for ObservationRequest {
    const TYPE: MessageType = MessageType::ObservationRequest;
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        out.extend_from_slice(&self.joining.0);
        put_code(out, &self.code)
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(ObservationRequest {
            joining: DeviceId(r.array()?),
            code: read_code(r)?,
        })
    }
}

macro_rules! bodies {
    ($($name:ident),* $(,)?) => {
        /// A message's type-specific body.
        #[derive(Debug, Clone, PartialEq, Eq)]
        #[allow(missing_docs)] // each variant holds the body struct of the same name
        pub enum Body {
            $($name($name),)*
        }

        impl Body {
            /// The message type this body belongs to.
            pub fn msg_type(&self) -> MessageType {
                match self {
                    $(Body::$name(_) => <$name as BodyCodec>::TYPE,)*
                }
            }

            /// Appends the body's bytes (without its length prefix).
            pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
                match self {
                    $(Body::$name(b) => b.encode(out),)*
                }
            }

            /// Reads a body of type `ty` that must fill all of `bytes`.
            pub fn decode(ty: MessageType, bytes: &[u8]) -> Result<Body, WireError> {
                let mut r = Reader::new(bytes);
                let body = match ty {
                    $(MessageType::$name => Body::$name($name::decode(&mut r)?),)*
                };
                r.expect_end()?;
                Ok(body)
            }
        }

        $(impl From<$name> for Body {
            fn from(b: $name) -> Body {
                Body::$name(b)
            }
        })*
    };
}

bodies!(
    Generic,
    Initiate,
    Response,
    Activate,
    Action,
    Data,
    IdRequest,
    JoinRequest,
    JoinCommand,
    HumanJoinRequest,
    HumanJoinResponse,
    ObservedJoinRequest,
    ObservedJoinResponse,
    ObservationRequest,
    Resign,
    Terminate,
    DeregisterRequest,
    DeregisterCommand,
);
