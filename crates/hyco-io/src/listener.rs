//! Listening sockets with a backlog sized for bursts.
//!
//! `TcpListener::bind` (tokio, like std) listens with a backlog of 128. A burst of more
//! connections than that at once (every manager reconnecting after a relay restart, an
//! application opening a pool of 200 connections through `hyco forward`) overflows the accept
//! queue; the kernel drops the extra SYNs and each of those clients waits out a retransmission:
//! one second, then three, then seven. The bench showed it: 9 900 loopback connections opened
//! in waves of 250 met 1 508 drops.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// The accept backlog asked for. The kernel caps it at `net.core.somaxconn` (4096 by default
/// since Linux 5.4).
pub const BACKLOG: u32 = 4096;

/// Binds `addr` (with `SO_REUSEADDR`, as `TcpListener::bind` does) and listens with
/// [`BACKLOG`].
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The kernel's cap on the backlog here.
    fn somaxconn() -> usize {
        std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(128)
    }

    /// A burst of connections all complete while nobody accepts yet: they wait in the accept
    /// queue instead of having their SYNs dropped. With the default backlog of 128 the
    /// connections past the 129th would still be waiting for a SYN retransmission.
    #[tokio::test]
    async fn a_burst_of_connections_waits_in_the_queue_without_retransmissions() {
        let l = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        // Nothing is accepted until the end: the queue alone must hold the burst.
        let n = somaxconn().saturating_sub(8).min(600);
        assert!(n > 200, "net.core.somaxconn here is too small to tell");
        let mut tasks = Vec::with_capacity(n);
        for _ in 0..n {
            tasks.push(tokio::spawn(async move {
                // Well under the first SYN retransmission (1 s).
                tokio::time::timeout(
                    Duration::from_millis(700),
                    tokio::net::TcpStream::connect(addr),
                )
                .await
            }));
        }
        let mut connected = Vec::with_capacity(n);
        for t in tasks {
            match t.await.unwrap() {
                Ok(Ok(s)) => connected.push(s),
                Ok(Err(e)) => panic!("connect failed: {e}"),
                Err(_) => {}
            }
        }
        assert_eq!(
            connected.len(),
            n,
            "some connections waited for a retransmission"
        );
        // And they are all there to accept.
        for _ in 0..n {
            tokio::time::timeout(Duration::from_secs(5), l.accept())
                .await
                .expect("queued connection")
                .unwrap();
        }
    }
}
