//! `keav demo`: the heart-rate scenario of issue 5 on embedded defaults.
//!
//! A heart-rate monitor sends readings to a phone through an MQTT broker and a relay. The
//! phone goes offline and comes back; it gets every reading once, in order, and the relay's
//! mailbox file — which held the readings meanwhile — contains none of them in the clear.
//!
//! Everything runs in this process on loopback: an embedded MQTT broker (rumqttd) on a free
//! port unless `--broker` or `--nats` names an external one, a relay (`keav relay`'s library
//! form) with its redb mailbox, and two devices with their own stores in a temporary
//! directory (or `--dir`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use keav_net::broker::LinkOptions;
use keav_net::device::{Device, DeviceSettings};
use keav_net::messenger::{Carrier, Delivery, Message, Messenger, MessengerOptions};
use keav_net::relay::{NextHop, Relay, RelayConfig, RouteRule};
use keav_verify::VerifySecret;

/// Options of the heart-rate demo (`keav demo`).
#[derive(Args, Debug)]
pub struct HeartArgs {
    /// Readings sent while the phone is online.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    online: u32,
    /// Readings sent while the phone is offline (kept by the relay's mailbox).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    offline: u32,
    /// Use this MQTT broker instead of the embedded one (`mqtt://HOST:PORT` or `HOST:PORT`).
    #[arg(long, value_name = "URL", conflicts_with = "nats")]
    broker: Option<String>,
    /// Use this NATS server instead of an MQTT broker (`nats://HOST:PORT` or `HOST:PORT`).
    #[arg(long, value_name = "URL")]
    nats: Option<String>,
    /// Keep the device stores and the relay's mailbox in this directory (default: temporary).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print only the summary.
    #[arg(long, short)]
    quiet: bool,
}

/// Which broker the run uses.
enum Broker {
    Embedded(keav_net::embedded_broker::EmbeddedBroker),
    Mqtt(String),
    Nats(String),
}

impl Broker {
    fn describe(&self) -> String {
        match self {
            Broker::Embedded(b) => format!("embedded MQTT broker (rumqttd) on {}", b.addr()),
            Broker::Mqtt(a) => format!("MQTT broker at {a}"),
            Broker::Nats(a) => format!("NATS server at {a}"),
        }
    }

    fn mqtt_addr(&self) -> Option<String> {
        match self {
            Broker::Embedded(b) => Some(b.addr().to_string()),
            Broker::Mqtt(a) => Some(a.clone()),
            Broker::Nats(_) => None,
        }
    }

    async fn link(&self, id: &str, opts: LinkOptions) -> Result<Carrier> {
        Ok(match (self.mqtt_addr(), self) {
            (Some(addr), _) => Carrier::Mqtt(Arc::new(
                keav_net::mqtt::Link::connect(&addr, id, opts)
                    .await
                    .with_context(|| format!("{id}: connecting to the MQTT broker at {addr}"))?,
            )),
            (None, Broker::Nats(addr)) => Carrier::Nats(Arc::new(
                keav_net::nats::Link::connect(addr, id, opts)
                    .await
                    .with_context(|| format!("{id}: connecting to the NATS server at {addr}"))?,
            )),
            (None, _) => bail!("internal: no broker address"),
        })
    }
}

/// `mqtt://h:p` / `nats://h:p` / `h:p` -> `h:p`.
fn strip_scheme<'a>(url: &'a str, scheme: &str) -> Result<&'a str> {
    let rest = url.strip_prefix(scheme).unwrap_or(url);
    if rest.contains("://") {
        bail!("{url:?}: expected {scheme}HOST:PORT");
    }
    if rest
        .rsplit_once(':')
        .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
    {
        bail!("{url:?}: expected {scheme}HOST:PORT");
    }
    Ok(rest)
}

/// The three names on the broker; with an external broker a random suffix keeps concurrent
/// runs (and what earlier runs left in persistent sessions) apart.
struct Names {
    relay: String,
    monitor: String,
    phone: String,
}

impl Names {
    fn new(external: bool) -> Names {
        let suffix = if external {
            let mut b = [0u8; 3];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
            format!(
                "-{}",
                b.iter().map(|x| format!("{x:02x}")).collect::<String>()
            )
        } else {
            String::new()
        };
        Names {
            relay: format!("relay{suffix}"),
            monitor: format!("monitor{suffix}"),
            phone: format!("phone{suffix}"),
        }
    }
}

/// One reading as the monitor sends it (the body of a message).
fn reading(n: u32) -> String {
    // A plausible resting heart rate that wanders a little; distinct text per reading so the
    // mailbox scan below can look for each one.
    let bpm = 64 + (n * 7 + n / 3) % 23;
    format!("{{\"reading\":{n},\"bpm\":{bpm},\"sensor\":\"chest-strap\"}}")
}

fn settings() -> DeviceSettings {
    DeviceSettings {
        // Provisioned on both devices (printed on the monitor's box in real life); never
        // printed or logged.
        verify_secret: Some(VerifySecret::new(
            b"heart-rate demo pairing code 4417".to_vec(),
        )),
        ..DeviceSettings::default()
    }
}

/// Runs the demo.
pub fn run(args: HeartArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        tokio::select! {
            r = scenario(&args) => r,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        }
    })
}

async fn scenario(args: &HeartArgs) -> Result<()> {
    let say = |s: String| {
        if !args.quiet {
            println!("{s}");
        }
    };
    let started = Instant::now();
    let tmp;
    let dir: &Path = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d
        }
        None => {
            tmp = tempfile::tempdir().context("creating a temporary directory")?;
            tmp.path()
        }
    };
    let broker = match (&args.broker, &args.nats) {
        (Some(url), _) => Broker::Mqtt(strip_scheme(url, "mqtt://")?.to_string()),
        (None, Some(url)) => Broker::Nats(strip_scheme(url, "nats://")?.to_string()),
        (None, None) => Broker::Embedded(
            keav_net::embedded_broker::EmbeddedBroker::start(Default::default())
                .context("starting the embedded MQTT broker")?,
        ),
    };
    let names = Names::new(!matches!(broker, Broker::Embedded(_)));
    let (relay_id, mon_id, phone_id) = (
        names.relay.as_str(),
        names.monitor.as_str(),
        names.phone.as_str(),
    );
    println!(
        "keav demo: heart-rate monitor -> relay -> phone, over the {}",
        broker.describe()
    );
    say(format!(
        "files (device stores, relay mailbox): {}",
        dir.display()
    ));

    // The relay: no keys, a durable mailbox, every destination delivered on the broker.
    let mailbox = dir.join("relay-mailbox.redb");
    let mut rc = RelayConfig::new(relay_id, mailbox.clone());
    let next = match broker.mqtt_addr() {
        Some(addr) => {
            rc.mqtt = Some((addr, LinkOptions::default()));
            NextHop::MqttDevice
        }
        None => {
            let Broker::Nats(addr) = &broker else {
                bail!("internal: no broker address");
            };
            rc.nats = Some((addr.clone(), LinkOptions::default()));
            NextHop::NatsDevice
        }
    };
    rc.routes = vec![RouteRule {
        dst: "*".into(),
        next,
    }];
    let relay = Relay::start(rc).await.context("starting the relay")?;
    say(format!(
        "relay {relay_id:?} started (mailbox {})",
        mailbox.display()
    ));

    let opts = MessengerOptions {
        delivery: Delivery::Relay(relay_id.into()),
        ..MessengerOptions::default()
    };
    // Stores are named after the role (`monitor.redb`, `phone.redb`), whatever the broker ids.
    let device = |role: &str| -> Result<Device> {
        Device::open(dir.join(format!("{role}.redb")), settings())
            .with_context(|| format!("opening the {role}'s store"))
    };
    let monitor = Messenger::start(
        device("monitor")?,
        broker.link(mon_id, LinkOptions::default()).await?,
        opts.clone(),
    )
    .await
    .context("starting the monitor")?;
    let phone = Messenger::start(
        device("phone")?,
        broker.link(phone_id, LinkOptions::default()).await?,
        opts.clone(),
    )
    .await
    .context("starting the phone")?;

    // 1. Pairing while both are online: KEAV handshake + automatic MitM check.
    let (accepted, zid) = tokio::join!(phone.accept_pair(), monitor.pair(phone_id));
    let (from, monitor_zid) = accepted.context("phone: pairing")?;
    let phone_zid = zid.context("monitor: pairing")?;
    say(format!(
        "paired: monitor {monitor_zid} <-> phone {phone_zid} (handshake + equality test over the broker; {from} verified)"
    ));

    let mut received: Vec<Message> = Vec::new();
    let total = args.online + args.offline;
    let timeout = Duration::from_secs(60);

    // 2. Online readings.
    for n in 0..args.online {
        monitor
            .send(phone_id, reading(n).as_bytes())
            .await
            .context("monitor: send")?;
    }
    for _ in 0..args.online {
        let m = tokio::time::timeout(timeout, phone.recv())
            .await
            .context("phone: waiting for a reading")??;
        say(format!(
            "phone <- #{:<3} {}  (from {}, verified)",
            m.seq,
            String::from_utf8_lossy(&m.body),
            m.from
        ));
        phone.ack(&m).await.context("phone: ack")?;
        received.push(m);
    }

    // 3. The phone goes offline; the monitor keeps sending.
    phone.shutdown().await.context("phone: shutting down")?;
    say(format!(
        "phone goes offline; the monitor sends {} readings",
        args.offline
    ));
    for n in args.online..total {
        monitor
            .send(phone_id, reading(n).as_bytes())
            .await
            .context("monitor: send")?;
    }
    // Wait until the relay holds them all.
    let deadline = Instant::now() + timeout;
    let held = loop {
        let held: u64 = relay
            .queues()
            .context("reading the relay's mailbox")?
            .iter()
            .filter(|(q, _)| q == phone_id)
            .map(|(_, s)| s.entries)
            .sum();
        if held >= u64::from(args.offline) || Instant::now() > deadline {
            break held;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let bytes = std::fs::read(&mailbox).context("reading the relay's mailbox file")?;
    let found = (args.online..total)
        .filter(|&n| contains(&bytes, reading(n).as_bytes()))
        .count();
    let bpm_found = contains(&bytes, b"\"bpm\"") || contains(&bytes, b"chest-strap");
    say(format!(
        "relay mailbox holds {held} entries for the phone ({} bytes on disk); readings found in it: {found} of {}{}",
        bytes.len(),
        args.offline,
        if bpm_found { " (field names found!)" } else { "" }
    ));
    if found > 0 || bpm_found {
        bail!("the relay's mailbox contains plaintext readings");
    }

    // 4. The phone comes back: same store, new process state.
    let phone = Messenger::start(
        device("phone")?,
        broker.link(phone_id, LinkOptions::default()).await?,
        opts.clone(),
    )
    .await
    .context("restarting the phone")?;
    say("phone is back online".into());
    while received.len() < total as usize {
        let m = tokio::time::timeout(timeout, phone.recv())
            .await
            .context("phone: waiting for the stored readings")??;
        say(format!(
            "phone <- #{:<3} {}  (from {}, verified)",
            m.seq,
            String::from_utf8_lossy(&m.body),
            m.from
        ));
        phone.ack(&m).await.context("phone: ack")?;
        received.push(m);
    }
    monitor
        .flush(phone_id, timeout)
        .await
        .context("monitor: waiting for the phone's acks")?;

    // 5. Check: every reading once, in order, from the verified monitor.
    let in_order = received.iter().enumerate().all(|(i, m)| {
        m.seq == i as u64
            && m.body == reading(i as u32).as_bytes()
            && m.from == mon_id
            && m.peer_zid == monitor_zid
    });
    let ms = monitor.stats();
    let ps = phone.stats();
    let rs = relay.stats();
    println!(
        "phone received {}/{} readings, each once, in order: {}; relay stored {} entries and never held a key; resends {}, duplicates dropped {}, forged/malformed rejected {}",
        received.len(),
        total,
        if in_order { "yes" } else { "NO" },
        rs.stored,
        ms.resent,
        ps.duplicates,
        ps.rejected + ms.rejected,
    );
    println!("done in {:.1} s", started.elapsed().as_secs_f64());
    monitor.shutdown().await.ok();
    phone.shutdown().await.ok();
    relay.shutdown().await.ok();
    if !in_order {
        bail!("the phone did not receive every reading exactly once, in order");
    }
    Ok(())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}
