//! Instance networking: a bridge Phoenix creates (with the gateway address) and removes, and
//! for each instance a veth pair, one end on the bridge, the other moved into the instance's
//! network namespace as `eth0` with its own address and a default route through the gateway.
//! Nothing is forwarded or masqueraded: addresses stay inside the machine. Everything is done
//! with rtnetlink messages (`netlink-packet-route`), no `ip` binary needed.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::Socket;
use netlink_sys::protocols::NETLINK_ROUTE;

use crate::DriverError;
use crate::policy::{Denied, Firewall, Member, PolicyConfig};
use crate::publish::Publisher;

/// An rtnetlink socket in the network namespace of the thread that opened it.
pub(crate) struct Netlink {
    socket: Socket,
    sequence: u32,
}

impl Netlink {
    pub(crate) fn open() -> io::Result<Netlink> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
        Ok(Netlink {
            socket,
            sequence: 0,
        })
    }

    /// Sends one request and collects the answers: an acknowledgement, or a dump's messages.
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.sequence += 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;
        let mut answers = Vec::new();
        let mut buffer = vec![0u8; 1 << 16];
        loop {
            let size = self.socket.recv(&mut &mut buffer[..], 0)?;
            let mut offset = 0;
            while offset < size {
                let reply =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buffer[offset..size])
                        .map_err(|e| io::Error::other(format!("netlink: {e}")))?;
                let length = reply.header.length as usize;
                if reply.header.sequence_number == self.sequence {
                    match reply.payload {
                        NetlinkPayload::Error(error) if error.code.is_some() => {
                            return Err(error.to_io());
                        }
                        NetlinkPayload::Error(_) | NetlinkPayload::Done(_) => return Ok(answers),
                        NetlinkPayload::InnerMessage(inner) => answers.push(inner),
                        _ => {}
                    }
                }
                if length == 0 {
                    break;
                }
                offset += length;
            }
        }
    }

    pub(crate) fn link_index(&mut self, name: &str) -> io::Result<Option<u32>> {
        let mut message = LinkMessage::default();
        message.attributes.push(LinkAttribute::IfName(name.into()));
        // With an acknowledgement after the answer, the reading knows where to stop.
        match self.request(RouteNetlinkMessage::GetLink(message), NLM_F_ACK) {
            Ok(answers) => Ok(answers.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(link.header.index),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn new_link(&mut self, name: &str, info: Vec<LinkInfo>) -> io::Result<()> {
        let mut message = LinkMessage::default();
        message.attributes.push(LinkAttribute::IfName(name.into()));
        message.attributes.push(LinkAttribute::LinkInfo(info));
        self.request(
            RouteNetlinkMessage::NewLink(message),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    pub(crate) fn add_bridge(&mut self, name: &str) -> io::Result<()> {
        self.new_link(name, vec![LinkInfo::Kind(InfoKind::Bridge)])
    }

    /// A veth pair whose peer is made directly in the network namespace `peer_netns` (a
    /// descriptor of it), with the MAC address `peer_mac`: moving a link between namespaces
    /// afterwards waits for an RCU grace period, 10 to 25 ms here.
    pub(crate) fn add_veth(
        &mut self,
        name: &str,
        peer: &str,
        peer_mac: [u8; 6],
        peer_netns: RawFd,
    ) -> io::Result<()> {
        let mut peer_message = LinkMessage::default();
        peer_message.attributes.extend([
            LinkAttribute::IfName(peer.into()),
            LinkAttribute::Address(peer_mac.to_vec()),
            LinkAttribute::NetNsFd(peer_netns),
        ]);
        self.new_link(
            name,
            vec![
                LinkInfo::Kind(InfoKind::Veth),
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_message))),
            ],
        )
    }

    fn set_link(&mut self, index: u32, edit: impl FnOnce(&mut LinkMessage)) -> io::Result<()> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        edit(&mut message);
        self.request(RouteNetlinkMessage::SetLink(message), NLM_F_ACK)
            .map(drop)
    }

    pub(crate) fn set_up(&mut self, index: u32) -> io::Result<()> {
        self.set_link(index, |link| {
            link.header.flags |= LinkFlags::Up;
            link.header.change_mask |= LinkFlags::Up;
        })
    }

    pub(crate) fn set_controller(&mut self, index: u32, bridge: u32) -> io::Result<()> {
        self.set_link(index, |link| {
            link.attributes.push(LinkAttribute::Controller(bridge))
        })
    }

    pub(crate) fn delete_link(&mut self, index: u32) -> io::Result<()> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        self.request(RouteNetlinkMessage::DelLink(message), NLM_F_ACK)
            .map(drop)
    }

    pub(crate) fn add_address(&mut self, index: u32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut message = AddressMessage::default();
        message.header.family = AddressFamily::Inet;
        message.header.prefix_len = prefix;
        message.header.index = index;
        message
            .attributes
            .push(AddressAttribute::Local(IpAddr::V4(addr)));
        message
            .attributes
            .push(AddressAttribute::Address(IpAddr::V4(addr)));
        self.request(
            RouteNetlinkMessage::NewAddress(message),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    pub(crate) fn add_default_route(&mut self, gateway: Ipv4Addr, index: u32) -> io::Result<()> {
        let mut message = RouteMessage::default();
        message.header.address_family = AddressFamily::Inet;
        message.header.table = RouteHeader::RT_TABLE_MAIN;
        message.header.protocol = RouteProtocol::Boot;
        message.header.scope = RouteScope::Universe;
        message.header.kind = RouteType::Unicast;
        message
            .attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
        message.attributes.push(RouteAttribute::Oif(index));
        self.request(
            RouteNetlinkMessage::NewRoute(message),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// Every IPv4 network this namespace knows: interface addresses and routes, with the link.
    fn networks(&mut self) -> io::Result<Vec<(Ipv4Addr, u8, u32)>> {
        let mut found = Vec::new();
        let mut query = AddressMessage::default();
        query.header.family = AddressFamily::Inet;
        for answer in self.request(RouteNetlinkMessage::GetAddress(query), NLM_F_DUMP)? {
            if let RouteNetlinkMessage::NewAddress(address) = answer {
                for attribute in &address.attributes {
                    if let AddressAttribute::Local(IpAddr::V4(ip)) = attribute {
                        found.push((*ip, address.header.prefix_len, address.header.index));
                    }
                }
            }
        }
        let mut query = RouteMessage::default();
        query.header.address_family = AddressFamily::Inet;
        for answer in self.request(RouteNetlinkMessage::GetRoute(query), NLM_F_DUMP)? {
            if let RouteNetlinkMessage::NewRoute(route) = answer {
                let mut destination = None;
                let mut link = 0;
                for attribute in &route.attributes {
                    match attribute {
                        RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
                            destination = Some(*ip)
                        }
                        RouteAttribute::Oif(index) => link = *index,
                        _ => {}
                    }
                }
                let table = route.header.table;
                if let Some(ip) = destination
                    && route.header.destination_prefix_length > 0
                    && table == RouteHeader::RT_TABLE_MAIN
                {
                    found.push((ip, route.header.destination_prefix_length, link));
                }
            }
        }
        Ok(found)
    }
}

/// An IPv4 network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    /// Parses `10.89.0.0/20`; the host bits must be zero.
    pub fn parse(text: &str) -> Result<Subnet, String> {
        let bad =
            || format!("invalid subnet {text:?}: write an IPv4 network like \"10.89.0.0/20\"");
        let (ip, prefix) = text.split_once('/').ok_or_else(bad)?;
        let network: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(8..=30).contains(&prefix) {
            return Err(format!(
                "subnet {text:?}: the prefix must be between /8 and /30"
            ));
        }
        let subnet = Subnet { network, prefix };
        if u32::from(network) & !subnet.mask() != 0 {
            return Err(format!("subnet {text:?}: the address has host bits set"));
        }
        Ok(subnet)
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    /// True when the two networks share an address.
    pub fn overlaps(&self, ip: Ipv4Addr, prefix: u8) -> bool {
        let shorter = prefix.min(self.prefix);
        let mask = if shorter == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(shorter))
        };
        u32::from(self.network) & mask == u32::from(ip) & mask
    }

    fn host(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + n)
    }

    fn hosts(&self) -> u32 {
        (1u32 << (32 - u32::from(self.prefix))) - 2
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// `[network]` of the fleet file, resolved: the bridge's name and its subnet (`None`: pick a
/// free /20 of 10.89.0.0/16).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    pub name: String,
    pub subnet: Option<Subnet>,
}

/// The bridge Phoenix made, and the addresses handed out on it.
#[derive(Debug)]
pub struct Bridge {
    name: String,
    subnet: Subnet,
    used: Mutex<BTreeSet<u32>>,
    /// The network policy's tables, once set and when some role is guarded.
    firewall: OnceLock<Firewall>,
    /// The published ports, in a cluster.
    publisher: OnceLock<Publisher>,
    /// Taken over from the previous program (`phoenix restart`), not made by this one.
    adopted: bool,
}

/// An address on the bridge and the name of the link that carries it, given back when
/// dropped (after the network policy forgot them).
#[derive(Debug)]
pub struct Lease {
    bridge: Arc<Bridge>,
    pub addr: Ipv4Addr,
    /// The host end of the instance's veth pair (at most 15 bytes).
    pub link: String,
    member: Option<Member>,
    /// The host port other hosts reach it at, once published.
    published: Option<u16>,
}

impl Lease {
    /// Publishes the instance serving on `port` to other hosts, when its bridge publishes.
    pub fn publish(&mut self, port: u16) -> Result<(), DriverError> {
        let Some(publisher) = self.bridge.publisher.get() else {
            return Ok(());
        };
        let offset = self.bridge.offset_of(self.addr).ok_or_else(|| {
            DriverError::Network(format!("{} is not an instance address", self.addr))
        })?;
        let port = publisher.add(offset, SocketAddrV4::new(self.addr, port))?;
        self.published = Some(port);
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let (Some(firewall), Some(member)) = (self.bridge.firewall.get(), &self.member) {
            firewall.forget(member);
        }
        if let (Some(publisher), Some(port)) = (self.bridge.publisher.get(), self.published) {
            publisher.remove(port);
        }
        let offset = u32::from(self.addr) - u32::from(self.bridge.subnet.network);
        self.bridge
            .used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&offset);
    }
}

/// Where automatic subnets come from.
const AUTO_POOL: Subnet = Subnet {
    network: Ipv4Addr::new(10, 89, 0, 0),
    prefix: 16,
};
const AUTO_PREFIX: u8 = 20;

impl Bridge {
    /// Takes over the bridge the previous program of this process made (`phoenix restart`):
    /// it stays up with `subnet`, and the instances on it keep their links and addresses.
    pub fn adopt(config: &BridgeConfig, subnet: Subnet) -> Result<Arc<Bridge>, DriverError> {
        let mut netlink = Netlink::open()
            .map_err(|e| DriverError::Network(format!("cannot open rtnetlink: {e}")))?;
        let exists = netlink
            .link_index(&config.name)
            .map_err(|e| DriverError::Network(format!("bridge {}: {e}", config.name)))?
            .is_some();
        if !exists || config.subnet.is_some_and(|wanted| wanted != subnet) {
            return Err(DriverError::Network(format!(
                "bridge {} with subnet {subnet} is not there to take over",
                config.name
            )));
        }
        Ok(Arc::new(Bridge {
            name: config.name.clone(),
            subnet,
            used: Mutex::new(BTreeSet::from([0, 1])),
            firewall: OnceLock::new(),
            publisher: OnceLock::new(),
            adopted: true,
        }))
    }

    /// Creates the bridge (replacing one a crashed run left), gives it the subnet's first
    /// address and brings it up. The subnet must not overlap any network of this host.
    pub fn create(config: &BridgeConfig) -> Result<Arc<Bridge>, DriverError> {
        let fail = |what: &str, e: io::Error| {
            DriverError::Network(format!("bridge {}: cannot {what}: {e}", config.name))
        };
        // Two Phoenixes picking subnets at once must not pick the same one.
        let _lock = host_lock().map_err(|e| fail("lock /run/phoenix-network.lock", e))?;
        let mut netlink = Netlink::open().map_err(|e| fail("open rtnetlink", e))?;
        if let Some(index) = netlink
            .link_index(&config.name)
            .map_err(|e| fail("look up", e))?
        {
            netlink
                .delete_link(index)
                .map_err(|e| fail("remove the bridge a previous run left", e))?;
        }
        let networks = netlink
            .networks()
            .map_err(|e| fail("list this host's networks", e))?;
        let subnet = match config.subnet {
            Some(subnet) => {
                if let Some((ip, prefix, _)) = networks
                    .iter()
                    .find(|(ip, prefix, _)| subnet.overlaps(*ip, *prefix))
                {
                    return Err(DriverError::Network(format!(
                        "subnet {subnet} overlaps this host's network {ip}/{prefix}: choose another `[network] subnet`"
                    )));
                }
                subnet
            }
            None => (0..1u32 << (AUTO_PREFIX - AUTO_POOL.prefix))
                .map(|i| Subnet {
                    network: AUTO_POOL.host(i << (32 - u32::from(AUTO_PREFIX))),
                    prefix: AUTO_PREFIX,
                })
                .find(|s| !networks.iter().any(|(ip, p, _)| s.overlaps(*ip, *p)))
                .ok_or_else(|| {
                    DriverError::Network(format!(
                        "every /{AUTO_PREFIX} of {AUTO_POOL} is in use on this host: set `[network] subnet`"
                    ))
                })?,
        };
        netlink
            .add_bridge(&config.name)
            .map_err(|e| fail("create", e))?;
        let index = netlink
            .link_index(&config.name)
            .map_err(|e| fail("look up", e))?
            .ok_or_else(|| fail("find the new bridge", io::ErrorKind::NotFound.into()))?;
        netlink
            .add_address(index, subnet.host(1), subnet.prefix)
            .map_err(|e| fail("add its address", e))?;
        netlink.set_up(index).map_err(|e| fail("bring it up", e))?;
        // A previous run's rules must not outlive it (this run may have none).
        Firewall::remove_stale(&config.name);
        Publisher::remove_stale(&config.name);
        Ok(Arc::new(Bridge {
            name: config.name.clone(),
            subnet,
            used: Mutex::new(BTreeSet::from([0, 1])),
            firewall: OnceLock::new(),
            publisher: OnceLock::new(),
            adopted: false,
        }))
    }

    /// Installs the network policy (once, before any instance starts; with no guarded role,
    /// nothing is installed).
    pub fn guard(&self, policy: &PolicyConfig) -> Result<(), DriverError> {
        if !policy.guards_anything() {
            return Ok(());
        }
        let firewall = Firewall::install(&self.name, self.gateway(), policy)?;
        self.firewall
            .set(firewall)
            .map_err(|_| DriverError::Network("the network policy is already installed".into()))
    }

    /// Publishes every instance to other hosts at `host_ip` and a port from `first_port` on
    /// (`first_port` + the instance's offset in the subnet), once, before any instance
    /// starts. A bridge taken over keeps the previous program's ports until
    /// [`Bridge::release_published`].
    pub fn publish(&self, host_ip: Ipv4Addr, first_port: u16) -> Result<(), DriverError> {
        let hosts = self.subnet.hosts() + 1;
        if !crate::publish::fits(first_port, hosts) {
            return Err(DriverError::Network(format!(
                "published ports: {hosts} ports from {first_port} on (one per address of {}) \
                 do not fit between 1024 and 65535: set a lower `[network] first_host_port`, or a \
                 smaller `[network] subnet`",
                self.subnet
            )));
        }
        let last_port = first_port + (hosts - 1) as u16;
        let ports = (first_port, last_port);
        let publisher = Publisher::install(&self.name, host_ip, ports, !self.adopted)?;
        self.publisher
            .set(publisher)
            .map_err(|_| DriverError::Network("the ports are already published".into()))
    }

    /// Where other hosts reach the instance at `addr` on this bridge, when published.
    pub fn published(&self, addr: SocketAddr) -> Option<SocketAddr> {
        let publisher = self.publisher.get()?;
        let SocketAddr::V4(addr) = addr else {
            return None;
        };
        let offset = self.offset_of(*addr.ip())?;
        Some(publisher.address_of(offset))
    }

    /// The hosts whose connections reach published ports (the cluster's other hosts).
    pub fn set_peers(&self, peers: impl IntoIterator<Item = Ipv4Addr>) -> Result<(), DriverError> {
        match self.publisher.get() {
            Some(publisher) => publisher.set_peers(peers.into_iter().collect()),
            None => Ok(()),
        }
    }

    /// After taking over the previous program's instances: published ports of those not
    /// taken over stop translating.
    pub fn release_published(&self) -> Result<(), DriverError> {
        match self.publisher.get() {
            Some(publisher) => publisher.release(),
            None => Ok(()),
        }
    }

    /// How far into the subnet `ip` is, when it is an instance's address.
    fn offset_of(&self, ip: Ipv4Addr) -> Option<u32> {
        let offset = u32::from(ip).checked_sub(u32::from(self.subnet.network))?;
        (2..=self.subnet.hosts())
            .contains(&offset)
            .then_some(offset)
    }

    /// Refused attempts between roles so far (empty without a network policy).
    pub fn denied(&self) -> Result<Vec<Denied>, DriverError> {
        match self.firewall.get() {
            Some(firewall) => firewall.denied(),
            None => Ok(Vec::new()),
        }
    }

    /// True when a network policy guards some role on this bridge.
    pub fn has_policy(&self) -> bool {
        self.firewall.get().is_some()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    /// The bridge's own address: instances' default route, and where the proxies listen for them.
    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.host(1)
    }

    /// The lowest free address, for an instance of `role` whose link is named after `unique`;
    /// with a network policy, the link is bound to the address and joins the role's set before
    /// the instance exists.
    pub fn lease(self: &Arc<Self>, role: &str, unique: &str) -> Result<Lease, DriverError> {
        let addr = self.free_address()?;
        self.lease_at(role, unique, addr)
    }

    /// Takes `addr` again for an instance that kept it across `phoenix restart`; with a
    /// network policy, its link joins the role's set again.
    pub fn adopt_lease(
        self: &Arc<Self>,
        role: &str,
        unique: &str,
        addr: Ipv4Addr,
    ) -> Result<Lease, DriverError> {
        let offset = u32::from(addr).wrapping_sub(u32::from(self.subnet.network));
        let fresh = (2..=self.subnet.hosts()).contains(&offset)
            && self
                .used
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(offset);
        if !fresh {
            return Err(DriverError::Network(format!(
                "{addr} is not a free address of {} ({})",
                self.name, self.subnet
            )));
        }
        self.lease_at(role, unique, addr)
    }

    /// The lease of `addr` (already marked used) for instance `unique` of `role`; with a
    /// network policy, its link joins the role's set.
    fn lease_at(
        self: &Arc<Self>,
        role: &str,
        unique: &str,
        addr: Ipv4Addr,
    ) -> Result<Lease, DriverError> {
        let link = link_name(unique);
        let mut lease = Lease {
            bridge: self.clone(),
            addr,
            link: link.clone(),
            member: None,
            published: None,
        };
        if let Some(firewall) = self.firewall.get() {
            let member = Member {
                link,
                addr,
                role: firewall.role_index(role),
            };
            firewall.admit(&member)?;
            lease.member = Some(member);
        }
        Ok(lease)
    }

    fn free_address(&self) -> Result<Ipv4Addr, DriverError> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let free = (2..=self.subnet.hosts())
            .find(|n| !used.contains(n))
            .ok_or_else(|| {
                DriverError::Network(format!(
                    "no free address left on {} ({})",
                    self.name, self.subnet
                ))
            })?;
        used.insert(free);
        Ok(self.subnet.host(free))
    }

    /// Deletes the bridge (at shutdown).
    pub fn remove(&self) -> Result<(), DriverError> {
        let fail = |e: io::Error| DriverError::Network(format!("remove bridge {}: {e}", self.name));
        if let Some(firewall) = self.firewall.get() {
            firewall.remove();
        }
        if let Some(publisher) = self.publisher.get() {
            publisher.uninstall();
        }
        let mut netlink = Netlink::open().map_err(fail)?;
        if let Some(index) = netlink.link_index(&self.name).map_err(fail)? {
            netlink.delete_link(index).map_err(fail)?;
        }
        Ok(())
    }
}

/// The plan for one instance's link, carried to the shim.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Attach {
    pub bridge: String,
    /// The host end's name (at most 15 bytes).
    pub host_link: String,
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
}

impl Attach {
    pub(crate) fn new(bridge: &Bridge, lease: &Lease) -> Attach {
        Attach {
            bridge: bridge.name.clone(),
            host_link: lease.link.clone(),
            addr: lease.addr,
            prefix: bridge.subnet.prefix,
            gateway: bridge.gateway(),
        }
    }

    /// Creates the veth pair from this (the host's) namespace with its `eth0` end already in
    /// `netns`, then configures that end from inside (entering `netns` for that, then leaving).
    pub(crate) fn apply(&self, netns: &std::fs::File) -> io::Result<()> {
        let context = |what: &'static str| {
            move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"))
        };
        let mut host = Netlink::open().map_err(context("open rtnetlink"))?;
        let bridge = host
            .link_index(&self.bridge)?
            .ok_or_else(|| io::Error::other(format!("bridge {} is gone", self.bridge)))?;
        if let Some(stale) = host.link_index(&self.host_link)? {
            host.delete_link(stale)
                .map_err(context("remove a stale veth"))?;
        }
        host.add_veth(
            &self.host_link,
            "eth0",
            mac_of(self.addr),
            netns.as_raw_fd(),
        )
        .map_err(context("create the veth pair"))?;
        let host_end = host
            .link_index(&self.host_link)?
            .ok_or_else(|| io::Error::other("the veth pair vanished"))?;
        host.set_controller(host_end, bridge)
            .map_err(context("attach to the bridge"))?;
        host.set_up(host_end)
            .map_err(context("bring the host end up"))?;
        in_netns(netns, || {
            let mut inside = Netlink::open()?;
            let lo = inside.link_index("lo")?.unwrap_or(1);
            inside.set_up(lo).map_err(context("bring lo up"))?;
            let eth0 = inside
                .link_index("eth0")?
                .ok_or_else(|| io::Error::other("eth0 is missing in the instance"))?;
            inside
                .add_address(eth0, self.addr, self.prefix)
                .map_err(context("add the address"))?;
            inside.set_up(eth0).map_err(context("bring eth0 up"))?;
            inside
                .add_default_route(self.gateway, eth0)
                .map_err(context("add the default route"))
        })
    }
}

/// The host end's name for the instance `unique` names (its cgroup path): 14 bytes.
fn link_name(unique: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    unique.hash(&mut hasher);
    format!("px{:012x}", hasher.finish() & 0xffff_ffff_ffff)
}

/// The MAC address of an instance's `eth0`, made from its IP address (locally administered, as
/// Docker does): an address handed out again keeps its MAC, so the host's neighbour cache
/// never sends a new instance's traffic to the old one's MAC until it expires.
fn mac_of(addr: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = addr.octets();
    [0x02, 0x50, a, b, c, d]
}

impl Attach {
    /// Deletes the veth pair (both ends go), if it is still there. The instance's network
    /// namespace may outlive it for a while (connections in TIME-WAIT hold it); its link on
    /// the bridge must not.
    pub(crate) fn remove(&self) {
        if let Ok(mut netlink) = Netlink::open()
            && let Ok(Some(index)) = netlink.link_index(&self.host_link)
        {
            let _ = netlink.delete_link(index);
        }
    }
}

/// Runs `work` with this thread in the network namespace `netns`, then returns to the one it
/// was in. Only for single-threaded helpers (the shim).
fn in_netns<T>(netns: &std::fs::File, work: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let home = std::fs::File::open("/proc/thread-self/ns/net")?;
    setns(netns, libc::CLONE_NEWNET)?;
    let result = work();
    setns(&home, libc::CLONE_NEWNET)?;
    result
}

pub(crate) fn setns(file: &std::fs::File, kind: libc::c_int) -> io::Result<()> {
    // SAFETY: setns(2) on a namespace descriptor we hold.
    if unsafe { libc::setns(file.as_raw_fd(), kind) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A host-wide lock while subnets are chosen.
fn host_lock() -> io::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/phoenix-network.lock")?;
    // SAFETY: flock on a descriptor we own; released when the file closes.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_and_overlap() {
        let subnet = Subnet::parse("10.89.16.0/20").unwrap();
        assert_eq!(subnet.host(1), Ipv4Addr::new(10, 89, 16, 1));
        assert_eq!(subnet.hosts(), 4094);
        assert!(subnet.overlaps(Ipv4Addr::new(10, 89, 20, 7), 24));
        assert!(subnet.overlaps(Ipv4Addr::new(10, 0, 0, 0), 8));
        assert!(!subnet.overlaps(Ipv4Addr::new(10, 89, 32, 0), 20));
        assert!(!subnet.overlaps(Ipv4Addr::new(127, 0, 0, 1), 8));
        assert!(
            Subnet::parse("10.89.16.1/20")
                .unwrap_err()
                .contains("host bits")
        );
        assert!(Subnet::parse("10.89.16.0/31").unwrap_err().contains("/30"));
        assert!(
            Subnet::parse("10.89.16.0")
                .unwrap_err()
                .contains("10.89.0.0/20")
        );
        assert_eq!(subnet.to_string(), "10.89.16.0/20");
    }

    #[test]
    fn macs_follow_addresses() {
        assert_eq!(mac_of(Ipv4Addr::new(10, 89, 0, 7)), [2, 0x50, 10, 89, 0, 7]);
        assert_ne!(
            mac_of(Ipv4Addr::new(10, 89, 0, 7)),
            mac_of(Ipv4Addr::new(10, 89, 0, 8))
        );
    }

    #[test]
    fn leases_take_the_lowest_free_address_and_give_it_back() {
        let bridge = Arc::new(Bridge {
            name: "test".into(),
            subnet: Subnet::parse("10.9.0.0/30").unwrap(),
            used: Mutex::new(BTreeSet::from([0, 1])),
            firewall: OnceLock::new(),
            publisher: OnceLock::new(),
            adopted: false,
        });
        let first = bridge.lease("web", "a").unwrap();
        assert_eq!(first.addr, Ipv4Addr::new(10, 9, 0, 2));
        assert!(
            bridge
                .lease("web", "b")
                .unwrap_err()
                .to_string()
                .contains("no free address")
        );
        drop(first);
        assert_eq!(
            bridge.lease("web", "c").unwrap().addr,
            Ipv4Addr::new(10, 9, 0, 2)
        );
    }
}
