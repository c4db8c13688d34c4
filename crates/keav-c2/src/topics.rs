//! The MQTT topic scheme of a C2 fleet, written so that Mosquitto ACL patterns can confine
//! each device to its own two topics (its broker user name is its [`DeviceId`] in hex):
//!
//! ```text
//! keav/c2/<server>/d/<device>   server -> device   (device: read only this one)
//! keav/c2/<server>/s/<device>   device -> server   (device: write only this one)
//! ```
//!
//! The server subscribes to `keav/c2/<server>/s/+` and publishes under `keav/c2/<server>/d/`.
//! The topic a message arrived on must name the message's sender id; [`Topics::sender_of`]
//! reads it so a receiver can compare before doing any signature work.

use crate::keys::DeviceId;

/// First two levels of every C2 topic.
pub const ROOT: &str = "keav/c2";

/// The topics of one server's fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topics {
    server: DeviceId,
}

impl Topics {
    /// The topics of the fleet of `server`.
    pub fn new(server: DeviceId) -> Topics {
        Topics { server }
    }

    /// The server's id.
    pub fn server(&self) -> DeviceId {
        self.server
    }

    /// Where the server publishes to `device` (the device subscribes here).
    pub fn to_device(&self, device: DeviceId) -> String {
        format!("{ROOT}/{}/d/{}", self.server, device)
    }

    /// Where `device` publishes to the server.
    pub fn to_server(&self, device: DeviceId) -> String {
        format!("{ROOT}/{}/s/{}", self.server, device)
    }

    /// The server's subscription: every device's outgoing topic.
    pub fn server_filter(&self) -> String {
        format!("{ROOT}/{}/s/+", self.server)
    }

    /// Mosquitto ACL pattern a device may read (`%u` is its user name, its id in hex).
    pub fn device_read_pattern(&self) -> String {
        format!("{ROOT}/{}/d/%u", self.server)
    }

    /// Mosquitto ACL pattern a device may write.
    pub fn device_write_pattern(&self) -> String {
        format!("{ROOT}/{}/s/%u", self.server)
    }

    /// The device a server-bound topic belongs to, or `None` if `topic` is not one of this
    /// server's `s/<device>` topics.
    pub fn sender_of(&self, topic: &str) -> Option<DeviceId> {
        let rest = topic.strip_prefix(ROOT)?.strip_prefix('/')?;
        let rest = rest.strip_prefix(self.server.to_hex().as_str())?;
        DeviceId::from_hex(rest.strip_prefix("/s/")?)
    }

    /// The device a device-bound topic addresses, or `None`.
    pub fn recipient_of(&self, topic: &str) -> Option<DeviceId> {
        let rest = topic.strip_prefix(ROOT)?.strip_prefix('/')?;
        let rest = rest.strip_prefix(self.server.to_hex().as_str())?;
        DeviceId::from_hex(rest.strip_prefix("/d/")?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_round_trips() {
        let t = Topics::new(DeviceId([1; 8]));
        let d = DeviceId([0xab; 8]);
        assert_eq!(
            t.to_device(d),
            "keav/c2/0101010101010101/d/abababababababab"
        );
        assert_eq!(
            t.to_server(d),
            "keav/c2/0101010101010101/s/abababababababab"
        );
        assert_eq!(t.sender_of(&t.to_server(d)), Some(d));
        assert_eq!(t.sender_of(&t.to_device(d)), None);
        assert_eq!(t.recipient_of(&t.to_device(d)), Some(d));
        assert_eq!(t.server_filter(), "keav/c2/0101010101010101/s/+");
        let other = Topics::new(DeviceId([2; 8]));
        assert_eq!(other.sender_of(&t.to_server(d)), None);
        assert_eq!(t.sender_of("keav/c2/0101010101010101/s/abab"), None);
        assert_eq!(
            t.sender_of("keav/c2/0101010101010101/s/abababababababab/x"),
            None
        );
    }
}
