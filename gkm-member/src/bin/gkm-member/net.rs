//! UDP sockets: joining a multicast group (IPv4 on a given interface address, IPv6 on an
//! interface index), sending to one, and the plain socket used for fan-out.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

/// A socket bound to `group`'s port that has joined `group` (on `v4_interface` for IPv4, on
/// interface index `v6_interface` for IPv6). Several processes may bind the same group.
pub(crate) fn multicast_receiver(
    group: SocketAddr,
    v4_interface: Ipv4Addr,
    v6_interface: u32,
) -> io::Result<UdpSocket> {
    if !group.ip().is_multicast() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a multicast address", group.ip()),
        ));
    }
    let socket = match group {
        SocketAddr::V4(g) => {
            let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.bind(&SocketAddr::V4(SocketAddrV4::new(*g.ip(), g.port())).into())?;
            socket.join_multicast_v4(g.ip(), &v4_interface)?;
            socket
        }
        SocketAddr::V6(g) => {
            let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
            socket.set_only_v6(true)?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.bind(&SocketAddr::V6(SocketAddrV6::new(*g.ip(), g.port(), 0, 0)).into())?;
            socket.join_multicast_v6(g.ip(), v6_interface)?;
            socket
        }
    };
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket.into())
}

/// A socket that sends to multicast `group` through `v4_interface` (or IPv6 interface index
/// `v6_interface`), with loopback on so local receivers see it, TTL/hops 1.
pub(crate) fn multicast_sender(
    group: SocketAddr,
    v4_interface: Ipv4Addr,
    v6_interface: u32,
) -> io::Result<UdpSocket> {
    let socket = match group {
        SocketAddr::V4(_) => {
            let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)).into())?;
            socket.set_multicast_if_v4(&v4_interface)?;
            socket.set_multicast_loop_v4(true)?;
            socket.set_multicast_ttl_v4(1)?;
            socket
        }
        SocketAddr::V6(_) => {
            let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
            socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)).into())?;
            socket.set_multicast_if_v6(v6_interface)?;
            socket.set_multicast_loop_v6(true)?;
            socket.set_multicast_hops_v6(1)?;
            socket
        }
    };
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket.into())
}

/// A plain socket on an ephemeral port, of the family of `peer`, for fan-out from the controller.
pub(crate) async fn fanout_socket(peer: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = match peer {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    UdpSocket::bind(local).await
}
