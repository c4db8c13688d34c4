//! Durable messaging with the library API ([`keav_net::messenger`]): a heart-rate monitor
//! and a phone on an MQTT broker pair once, the monitor sends readings, the phone goes
//! offline while more readings are sent, then comes back (a new process: its store is
//! opened again from the file) and gets every reading once, in order, from the verified
//! monitor.
//!
//! ```text
//! cargo run -p keav-net --example heart_rate              # embedded broker (default feature)
//! cargo run -p keav-net --example heart_rate 127.0.0.1:1883
//! ```
//!
//! The broker sees only handshake packets and sealed records. Without a persistent session
//! the readings sent while the phone is away are kept by the monitor's outbox and resent
//! until the phone acknowledges them end to end; this example resends every second at most
//! so it finishes quickly (the defaults back off up to a minute).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use keav_net::device::{Device, DeviceSettings};
use keav_net::messenger::{Carrier, Messenger, MessengerOptions};
use keav_net::mqtt::{Link, LinkOptions};
use keav_net::Error;
use keav_verify::VerifySecret;

const MONITOR: &str = "hr-monitor";
const PHONE: &str = "phone";
const WAIT: Duration = Duration::from_secs(30);

fn device(dir: &Path, name: &str) -> Result<Device, Error> {
    let settings = DeviceSettings {
        // The code both devices were given (printed on the strap, typed into the app): the
        // handshake's equality test binds the session to it, so a broker in the middle
        // cannot pair with either device.
        verify_secret: Some(VerifySecret::from("strap 3141-5926")),
        ..DeviceSettings::default()
    };
    Device::open(dir.join(format!("{name}.keav")), settings)
}

async fn messenger(
    dir: &Path,
    broker: &str,
    name: &str,
    opts: &MessengerOptions,
) -> Result<Messenger, Error> {
    let link = Link::connect(broker, name, LinkOptions::default()).await?;
    Messenger::start(
        device(dir, name)?,
        Carrier::Mqtt(Arc::new(link)),
        opts.clone(),
    )
    .await
}

fn reading(n: u32) -> String {
    format!("{{\"bpm\":{},\"n\":{n}}}", 60 + (n * 7) % 40)
}

async fn receive(phone: &Messenger, count: usize) -> Result<(), Error> {
    for _ in 0..count {
        let m = tokio::time::timeout(WAIT, phone.recv())
            .await
            .map_err(|_| Error::Timeout("a reading"))??;
        println!(
            "phone <- #{:<2} {}  (from {}, verified)",
            m.seq,
            String::from_utf8_lossy(&m.body),
            m.from
        );
        // Done with it: not released again after a restart.
        phone.ack(&m).await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    #[cfg(feature = "embedded-broker")]
    let embedded;
    let broker = match std::env::args().nth(1) {
        Some(addr) => addr,
        #[cfg(feature = "embedded-broker")]
        None => {
            embedded = keav_net::embedded_broker::EmbeddedBroker::start(Default::default())?;
            embedded.addr().to_string()
        }
        #[cfg(not(feature = "embedded-broker"))]
        None => return Err("usage: heart_rate BROKER_HOST:PORT".into()),
    };
    let mut opts = MessengerOptions::default();
    opts.durable.outbox.rto_initial_ms = 250;
    opts.durable.outbox.rto_max_ms = 1_000;

    let monitor = messenger(dir.path(), &broker, MONITOR, &opts).await?;
    let phone = messenger(dir.path(), &broker, PHONE, &opts).await?;

    // Once, while both are online.
    let (zid, accepted) = tokio::join!(monitor.pair(PHONE), phone.accept_pair());
    let (from, monitor_zid) = accepted?;
    println!("paired: {from} ({monitor_zid:?}) <-> {PHONE} ({:?})", zid?);

    for n in 0..3 {
        monitor.send(PHONE, reading(n).as_bytes()).await?;
    }
    receive(&phone, 3).await?;

    phone.shutdown().await?;
    println!("phone offline; the monitor keeps measuring");
    for n in 3..13 {
        let seq = monitor.send(PHONE, reading(n).as_bytes()).await?;
        println!("monitor -> #{seq:<2} committed to the outbox");
    }

    let phone = messenger(dir.path(), &broker, PHONE, &opts).await?;
    println!("phone back online");
    receive(&phone, 10).await?;
    monitor.flush(PHONE, WAIT).await?;
    println!("monitor: every reading acknowledged end to end");
    println!("monitor {:?}", monitor.stats());
    println!("phone   {:?}", phone.stats());
    monitor.shutdown().await?;
    phone.shutdown().await?;
    Ok(())
}
