//! A simulated scanner for the tests: publishes events over MQTT 3.1.1 at QoS 1, one at a time,
//! and records every id that got its PUBACK. It rides out agent restarts and link trouble by
//! reconnecting and re-sending the event that was not acknowledged, as a real scanner app does.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Packet, Publish};

pub struct Scanner {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
    attempts: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

/// Makes the JSON of the event with this id (its number within the scanner is `n`).
pub type EventMaker = fn(id: &str, n: u64) -> String;

impl Scanner {
    /// Publishes to `scans/{device}` on the agent at `agent`, about `per_second` events a
    /// second, ids `{device}-{n}`.
    pub fn start(agent: SocketAddr, device: &str, per_second: u32, make: EventMaker) -> Scanner {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let attempts = Arc::new(AtomicU64::new(0));
        let (t_stop, t_acked, t_attempts) = (stop.clone(), acked.clone(), attempts.clone());
        let device = device.to_string();
        let handle = std::thread::spawn(move || {
            let pause = Duration::from_secs_f64(1.0 / f64::from(per_second.max(1)));
            let mut connection: Option<(TcpStream, BytesMut)> = None;
            let mut n = 0u64;
            let mut pkid = 0u16;
            while !t_stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                let id = format!("{device}-{n}");
                if connection.is_none() {
                    connection = connect(agent, &device);
                    if connection.is_none() {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                }
                let Some((stream, buf)) = connection.as_mut() else {
                    continue;
                };
                pkid = pkid.wrapping_add(1).max(1);
                t_attempts.fetch_add(1, Ordering::SeqCst);
                let mut publish =
                    Publish::new(format!("scans/{device}"), QoS::AtLeastOnce, make(&id, n));
                publish.pkid = pkid;
                if publish_and_wait(stream, buf, &Packet::Publish(publish), pkid) {
                    if let Ok(mut list) = t_acked.lock() {
                        list.push(id);
                    }
                    n += 1;
                    if let Some(rest) = pause.checked_sub(started.elapsed()) {
                        std::thread::sleep(rest);
                    }
                } else {
                    // Not acknowledged: the same event goes again on a new connection.
                    connection = None;
                }
            }
            if let Some((mut stream, _)) = connection {
                let mut out = BytesMut::new();
                let _ = Packet::Disconnect.write(&mut out, 1 << 20);
                let _ = stream.write_all(&out);
            }
        });
        Scanner {
            stop,
            acked,
            attempts,
            handle: Some(handle),
        }
    }

    pub fn acked_count(&self) -> usize {
        self.acked.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// Stops publishing and returns every acknowledged id, in order.
    pub fn stop(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
        self.acked.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::SeqCst)
    }
}

impl Drop for Scanner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn connect(agent: SocketAddr, device: &str) -> Option<(TcpStream, BytesMut)> {
    let mut stream = TcpStream::connect_timeout(&agent, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.set_nodelay(true).ok()?;
    let mut connect = Connect::new(device);
    connect.keep_alive = 60;
    let mut out = BytesMut::new();
    Packet::Connect(connect).write(&mut out, 1 << 20).ok()?;
    stream.write_all(&out).ok()?;
    let mut buf = BytesMut::new();
    match read_packet(&mut stream, &mut buf)? {
        Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => Some((stream, buf)),
        _ => None,
    }
}

fn publish_and_wait(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    packet: &Packet,
    pkid: u16,
) -> bool {
    let mut out = BytesMut::new();
    if packet.write(&mut out, 1 << 20).is_err() || stream.write_all(&out).is_err() {
        return false;
    }
    loop {
        match read_packet(stream, buf) {
            Some(Packet::PubAck(ack)) if ack.pkid == pkid => return true,
            Some(_) => continue,
            None => return false,
        }
    }
}

fn read_packet(stream: &mut TcpStream, buf: &mut BytesMut) -> Option<Packet> {
    let mut chunk = [0u8; 4096];
    loop {
        match Packet::read(buf, 1 << 20) {
            Ok(packet) => return Some(packet),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(_) => return None,
        }
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A pick of its own order, so every event is its own ordering key.
pub fn pick_event(id: &str, n: u64) -> String {
    format!(
        r#"{{"v":1,"id":"{id}","type":"pick","ts":"2026-11-22T10:15:00.123Z","order":"SO-{}","line":1,"sku":"SKU-{}","qty":"1","location":"A-01-03"}}"#,
        n / 5,
        n % 50
    )
}
