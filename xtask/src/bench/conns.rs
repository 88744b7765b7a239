//! `xtask bench-conns` (hidden; the memory benchmark runs it inside the bench namespace): many
//! TCP connections on loopback, spread over several listener addresses (127.0.0.1..K, one
//! listener each) so that no destination runs out of ephemeral ports.
//!
//! - `hold`: opens N connections, prints `ready N`, keeps them open until stdin closes.
//! - `churn`: N short connections (connect, the server accepts and closes first, the client reads
//!   the end and closes), from several threads, stopped at N or after a time limit; prints
//!   `done COMPLETED ERRORS SECONDS`.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

#[derive(Debug, Clone, clap::Args)]
pub struct ConnsArgs {
    /// `hold` or `churn`.
    #[arg(value_parser = ["hold", "churn"])]
    pub mode: String,
    /// Connections to open.
    #[arg(long)]
    pub conns: u64,
    /// Listener port (on each address).
    #[arg(long)]
    pub port: u16,
    /// Listener addresses 127.0.0.1 ..= 127.0.0.K.
    #[arg(long, default_value_t = 4)]
    pub addrs: u8,
    /// churn: client threads.
    #[arg(long, default_value_t = 4)]
    pub threads: u32,
    /// Time limit in seconds.
    #[arg(long, default_value_t = 120)]
    pub seconds: u64,
}

fn addr(i: u8, port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(127, 0, 0, i + 1), port))
}

pub fn main(args: &ConnsArgs) -> Result<()> {
    if args.addrs == 0 || args.addrs > 250 {
        bail!("--addrs must be 1..=250");
    }
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let accepted = Arc::new(AtomicU64::new(0));
    let hold = args.mode == "hold";
    for i in 0..args.addrs {
        let listener = TcpListener::bind(addr(i, args.port))
            .with_context(|| format!("cannot listen on {}", addr(i, args.port)))?;
        let accepted = Arc::clone(&accepted);
        // Accept loops end with the process.
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                accepted.fetch_add(1, Ordering::Relaxed);
                // hold: keep the server side open too; churn: close it first.
                if hold {
                    kept.push(stream);
                }
            }
        });
    }
    if hold { hold_open(args, &accepted, deadline) } else { churn(args, deadline) }
}

fn hold_open(args: &ConnsArgs, accepted: &AtomicU64, deadline: Instant) -> Result<()> {
    let per = args.conns.div_ceil(u64::from(args.addrs));
    let clients: Vec<_> = (0..args.addrs)
        .map(|i| {
            let target = addr(i, args.port);
            std::thread::spawn(move || -> Result<Vec<TcpStream>> {
                let mut v = Vec::new();
                for n in 0..per {
                    if Instant::now() > deadline {
                        bail!("time limit reached after {n} connections to {target}");
                    }
                    v.push(
                        TcpStream::connect(target)
                            .with_context(|| format!("connection {n} to {target}"))?,
                    );
                }
                Ok(v)
            })
        })
        .collect();
    let mut streams = Vec::new();
    for c in clients {
        streams.extend(c.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))??);
    }
    while accepted.load(Ordering::Relaxed) < streams.len() as u64 {
        if Instant::now() > deadline {
            bail!(
                "only {} of {} connections accepted",
                accepted.load(Ordering::Relaxed),
                streams.len()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("ready {}", streams.len());
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(streams);
    Ok(())
}

fn churn(args: &ConnsArgs, deadline: Instant) -> Result<()> {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..args.threads)
        .map(|t| {
            let (done, errors) = (Arc::clone(&done), Arc::clone(&errors));
            let (conns, addrs, port) = (args.conns, args.addrs, args.port);
            std::thread::spawn(move || {
                let mut k = u8::try_from(t % u32::from(addrs)).unwrap_or(0);
                let mut buf = [0u8; 16];
                while Instant::now() < deadline && done.load(Ordering::Relaxed) < conns {
                    k = (k + 1) % addrs;
                    match TcpStream::connect(addr(k, port)) {
                        // The server closes first: read its end, then close ours.
                        Ok(mut s) => {
                            let _ = s.read(&mut buf);
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
    }
    println!(
        "done {} {} {:.3}",
        done.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
