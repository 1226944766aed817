// js-libp2p peer for scripts/natlab/interop_js: TCP + Noise + yamux, identify, ping, Circuit Relay
// v2 client (a reservation on --relay) and DCUtR. Events are JSON lines on stdout; js-libp2p's own
// debug log (DEBUG=libp2p:dcutr*,...) goes to stderr.
//
//   node peer.mjs --listen /ip4/10.1.0.2/tcp/4002 --relay /ip4/11.0.0.10/tcp/4001/p2p/<id> \
//                 [--dial <multiaddr>] [--announce <multiaddr>] [--seconds 60] [--force-dcutr-after 2]
//                 [--reuse-port]   (with LD_PRELOAD=reuseport.so: see reuseport.c)

// Node 20: libp2p 3 (and p-retry/nanoid) expect Promise.withResolvers (Node 22); set it before
// any libp2p module is loaded, hence the dynamic imports below.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function withResolvers () {
    let resolve, reject
    const promise = new this((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}

const { parseArgs } = await import('node:util')
const { createLibp2p } = await import('libp2p')
const { tcp } = await import('@libp2p/tcp')
const { noise } = await import('@chainsafe/libp2p-noise')
const { yamux } = await import('@chainsafe/libp2p-yamux')
const { identify } = await import('@libp2p/identify')
const { ping } = await import('@libp2p/ping')
const { dcutr } = await import('@libp2p/dcutr')
const { circuitRelayTransport } = await import('@libp2p/circuit-relay-v2')
const { multiaddr } = await import('@multiformats/multiaddr')

const { values: opt } = parseArgs({
  options: {
    listen: { type: 'string', default: '/ip4/0.0.0.0/tcp/4002' },
    relay: { type: 'string' },
    dial: { type: 'string' },
    announce: { type: 'string', multiple: true, default: [] }, // extra addresses to advertise
    seconds: { type: 'string', default: '60' },
    // start DCUtR as B on an inbound relayed connection that identify did not complete on
    // (js-libp2p's dcutr topology only fires after identify lists /libp2p/dcutr)
    'force-dcutr-after': { type: 'string' },
    // dial from the listen address and port, as go-libp2p and our node do (a TCP hole punch needs
    // it); Node.js can bind a connecting socket there only with reuseport.so preloaded
    'reuse-port': { type: 'boolean', default: false }
  }
})

const t0 = Date.now()
const emit = (ev) => process.stdout.write(JSON.stringify({ t: (Date.now() - t0) / 1000, ...ev }) + '\n')
const conn = (c) => ({
  peer: c.remotePeer.toString(),
  addr: c.remoteAddr.toString(),
  direction: c.direction,
  limited: c.limits != null,
  relayed: c.remoteAddr.toString().includes('/p2p-circuit'),
  id: c.id
})

const listen = [opt.listen]
const [, , listenHost, , listenPort] = opt.listen.split('/') // /ip4/<host>/tcp/<port>
const dialOpts = opt['reuse-port'] ? { localAddress: listenHost, localPort: Number(listenPort) } : {}
if (opt.relay) listen.push(`${opt.relay}/p2p-circuit`) // listening on a relay = reserving a slot
const node = await createLibp2p({
  addresses: { listen, appendAnnounce: opt.announce },
  transports: [tcp({ dialOpts }), circuitRelayTransport()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  connectionGater: { denyDialMultiaddr: () => false }, // the lab's addresses are all fine
  services: { identify: identify(), ping: ping(), dcutr: dcutr() }
})

const identified = new Set()
node.addEventListener('connection:open', (e) => {
  const c = e.detail
  emit({ event: 'connection:open', ...conn(c) })
  if (opt['force-dcutr-after'] == null || c.direction !== 'inbound' || c.limits == null) return
  setTimeout(async () => {
    if (identified.has(c.remotePeer.toString()) || c.status !== 'open') return
    emit({ event: 'force_dcutr', ...conn(c) })
    try {
      await node.peerStore.merge(c.remotePeer, {}) // upgradeInbound reads the peer's entry
      await node.services.dcutr.upgradeInbound(c)
      emit({ event: 'force_dcutr_done', ...conn(c) })
    } catch (err) {
      emit({ event: 'force_dcutr_error', error: String(err) })
    }
  }, Number(opt['force-dcutr-after']) * 1000)
})
node.addEventListener('connection:close', (e) => emit({ event: 'connection:close', ...conn(e.detail) }))
node.addEventListener('peer:identify', (e) => emit({
  event: 'identify',
  peer: e.detail.peerId.toString(),
  agent: e.detail.agentVersion,
  protocols: e.detail.protocols,
  observed: e.detail.observedAddr?.toString(),
  listen: e.detail.listenAddrs.map(String)
}, identified.add(e.detail.peerId.toString())))
let reserved = false
node.addEventListener('self:peer:update', () => {
  const addrs = node.getMultiaddrs().map(String)
  const circuit = addrs.filter((a) => a.includes('/p2p-circuit'))
  if (circuit.length > 0 && !reserved) {
    reserved = true
    emit({ event: 'reserved', addrs: circuit })
  }
  emit({ event: 'addrs', addrs })
})

await node.start()
emit({ event: 'ready', peer_id: node.peerId.toString(), addrs: node.getMultiaddrs().map(String) })

if (opt.dial) {
  try {
    const c = await node.dial(multiaddr(opt.dial))
    emit({ event: 'dialed', ...conn(c) })
  } catch (err) {
    emit({ event: 'dial_error', error: String(err) })
  }
}

const report = () => emit({
  event: 'connections',
  connections: node.getConnections().map(conn)
})
const timer = setInterval(report, 5000)
const stop = async () => {
  clearInterval(timer)
  report()
  await node.stop()
  emit({ event: 'stopped' })
  process.exit(0)
}
process.on('SIGTERM', stop)
process.on('SIGINT', stop)
setTimeout(stop, Number(opt.seconds) * 1000)
