# frozen_string_literal: true

require "net/http"
require "socket"
require "resolv"
require "digest"
require "ipaddr"
require_relative "../support/netns"

# The harness the network specs use as "the internet" (spec/support/netns.rb), checked
# from the host: every service answers, names resolve, the big file is byte-exact.
RSpec.describe "the test internet (network namespace)" do
  let(:net) { MicrosandboxSpec::NetNS.start! }

  it "serves HTTP, including the 64 MiB file byte-exact" do
    expect(Net::HTTP.get(URI("http://#{net::WEB}/hello"))).to eq("hello from the test internet\n")
    digest = Digest::SHA256.new
    size = 0
    Net::HTTP.start(net::WEB, 80, read_timeout: 60) do |http|
      http.request_get("/big") do |res|
        expect(res.code).to eq("200")
        res.read_body { |chunk| digest << chunk; size += chunk.bytesize }
      end
      expect(http.get("/missing").code).to eq("404")
    end
    expect(size).to eq(net::BIG_SIZE)
    expect(digest.hexdigest).to eq(net.big_sha256)
    [net::WEB6, net::WEB6_OTHER].each do |addr|
      expect(Net::HTTP.get(URI("http://[#{addr}]/hello"))).to eq("hello from the test internet\n")
    end
  end

  it "routes only its IPv6 /64 into the namespace, and makes the unreachable prefix fail at once" do
    expect(`ip -6 route show #{net::NET6}`).to include("dev ")
    expect(`ip -6 route show #{net::UNREACHABLE6}`).to include("unreachable")
    expect { Socket.tcp("2001:db8:6d73:ffff::1", 80, connect_timeout: 5) }
      .to raise_error(satisfy { |e| [Errno::ENETUNREACH, Errno::EHOSTUNREACH].include?(e.class) })
  end

  it "echoes over TCP and UDP" do
    Socket.tcp(net::WEB, 7, connect_timeout: 5) do |s|
      s.write("ping\n")
      expect(s.wait_readable(5)).to be_truthy
      expect(s.readpartial(100)).to eq("ping\n")
    end
    u = UDPSocket.new
    u.send("datagram", 0, net::WEB, 7)
    expect(u.wait_readable(5)).to be_truthy
    expect(u.recvfrom(100).first).to eq("datagram")
  ensure
    u&.close
  end

  it "answers the test names, and nothing else, from its DNS server" do
    Resolv::DNS.open(nameserver_port: [[net::DNS, 53]]) do |dns|
      dns.timeouts = 3
      net::NAMES.each { |name, addr| expect(dns.getaddress(name).to_s).to eq(addr) }
      net::NAMES6.each do |name, addr|
        expect(dns.getresource(name, Resolv::DNS::Resource::IN::AAAA).address.to_s.downcase).to eq(IPAddr.new(addr).to_s)
      end
      expect(dns.getaddress("alias.inet.test").to_s).to eq(net::WEB)
      expect { dns.getaddress("example.com") }.to raise_error(Resolv::ResolvError)
    end
  end

  it "refuses to start without root, saying why (it is never skipped silently)" do
    script = "require #{File.expand_path("../support/netns", __dir__).dump}; " \
             "begin; MicrosandboxSpec::NetNS.start!; rescue => e; warn e.message; exit 3; end"
    out = IO.popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", RbConfig.ruby, "-e", script],
                   err: %i[child out], &:read)
    expect($?.exitstatus).to eq(3)
    expect(out).to include("needs root")
  end

  it "is gone after stop! and comes back on the next start!" do
    name = net.name
    net.stop!
    expect(`ip netns list`).not_to include(name)
    expect(`ip route show #{net::ROUTE}`.strip).to eq("")
    expect(`ip -6 route show #{net::UNREACHABLE6}`.strip).to eq("")
    expect(`ip -6 route show #{net::NET6}`.strip).to eq("")
    net.start!
    expect(Net::HTTP.get(URI("http://#{net::WEB}/hello"))).to eq("hello from the test internet\n")
  end
end
