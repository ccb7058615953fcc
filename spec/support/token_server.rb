# frozen_string_literal: true

require "base64"
require "fileutils"
require "json"
require "openssl"
require "securerandom"
require "socket"
require "tmpdir"
require "uri"

module MicrosandboxSpec
  # A registry token server (the Docker "token" auth flow) for the specs, on 127.0.0.1.
  #
  # A client that gets `401 WWW-Authenticate: Bearer realm=…,service=…,scope=…` from the
  # registry asks this server for a token, with HTTP Basic credentials. Known users get a
  # JWT granting the actions they asked for; anonymous callers get a token granting nothing
  # (so the registry refuses them); wrong credentials get 401. Tokens are RS256 JWTs signed
  # by a key whose certificate, issued by a throwaway test CA, travels in the JWT header
  # (`x5c`); the registry trusts the CA (`rootcertbundle`).
  #
  # Runs in a thread of the spec process: engine calls release the GVL while they pull.
  class TokenServer
    SERVICE = "msb-test-registry"
    ISSUER = "msb-test-token-issuer"

    attr_reader :realm, :ca_path

    # users: { "name" => "password" }
    def initialize(users)
      @users = users
      @requests = [] # [account or nil, scope, HTTP status], one per token request
      @lock = Mutex.new
    end

    # The token requests served so far.
    def requests = @lock.synchronize { @requests.dup }

    def start
      @dir = Dir.mktmpdir("msb-token")
      make_keys
      @server = TCPServer.new("127.0.0.1", 0)
      @realm = "http://127.0.0.1:#{@server.addr[1]}/token"
      @thread = Thread.new { loop { serve(@server.accept) } }
      self
    end

    def stop
      @thread&.kill
      @server&.close
      FileUtils.rm_rf(@dir) if @dir
    end

    # `auth:` section of a docker-registry config.
    def registry_config
      { "token" => { "realm" => realm, "service" => SERVICE, "issuer" => ISSUER, "rootcertbundle" => ca_path } }
    end

    # A token for `account` granting `actions` on repository `name` (used by the spec's pusher).
    def token(account, name, actions)
      jwt(account, [{ "type" => "repository", "name" => name, "actions" => actions }])
    end

    private

    def make_keys
      @ca_key = OpenSSL::PKey::RSA.new(2048)
      ca = certificate("msb test token CA", @ca_key.public_key, serial: 1)
      ca.issuer = ca.subject
      ext = OpenSSL::X509::ExtensionFactory.new(ca, ca)
      ca.add_extension(ext.create_extension("basicConstraints", "CA:TRUE", true))
      ca.add_extension(ext.create_extension("keyUsage", "keyCertSign,cRLSign", true))
      ca.sign(@ca_key, OpenSSL::Digest.new("SHA256"))

      @key = OpenSSL::PKey::RSA.new(2048)
      leaf = certificate("msb test token signer", @key.public_key, serial: 2)
      leaf.issuer = ca.subject
      ext = OpenSSL::X509::ExtensionFactory.new(ca, leaf)
      leaf.add_extension(ext.create_extension("basicConstraints", "CA:FALSE", true))
      leaf.add_extension(ext.create_extension("keyUsage", "digitalSignature", true))
      leaf.sign(@ca_key, OpenSSL::Digest.new("SHA256"))
      @leaf_der = leaf.to_der
      @ca_path = File.join(@dir, "ca.pem")
      File.write(@ca_path, ca.to_pem)
    end

    def certificate(cn, public_key, serial:)
      OpenSSL::X509::Certificate.new.tap do |c|
        c.version = 2
        c.serial = serial
        c.subject = OpenSSL::X509::Name.parse("/CN=#{cn}")
        c.public_key = public_key
        c.not_before = Time.now - 3600
        c.not_after = Time.now + 86_400
      end
    end

    def record(*request) = @lock.synchronize { @requests << request }

    def b64(bytes) = Base64.urlsafe_encode64(bytes, padding: false)

    def jwt(account, access)
      now = Time.now.to_i
      header = { "typ" => "JWT", "alg" => "RS256", "x5c" => [Base64.strict_encode64(@leaf_der)] }
      claims = { "iss" => ISSUER, "sub" => account.to_s, "aud" => SERVICE, "iat" => now, "nbf" => now - 60,
                 "exp" => now + 600, "jti" => SecureRandom.hex(8), "access" => access }
      signing_input = "#{b64(JSON.generate(header))}.#{b64(JSON.generate(claims))}"
      "#{signing_input}.#{b64(@key.sign(OpenSSL::Digest.new('SHA256'), signing_input))}"
    end

    # One request per connection (answers with Connection: close).
    def serve(sock)
      request_line = sock.gets.to_s
      headers = {}
      while (line = sock.gets) && line != "\r\n"
        k, v = line.split(":", 2)
        headers[k.strip.downcase] = v.to_s.strip
      end
      status, body = answer(request_line, headers)
      sock.write("HTTP/1.1 #{status}\r\nContent-Type: application/json\r\nContent-Length: #{body.bytesize}\r\n" \
                 "Connection: close\r\n\r\n#{body}")
    rescue StandardError => e
      warn "token server: #{e.class}: #{e.message}"
    ensure
      sock.close
    end

    def answer(request_line, headers)
      _, target = request_line.split
      uri = URI("http://x#{target}")
      return ["404 Not Found", "{}"] unless uri.path == "/token"

      params = URI.decode_www_form(uri.query.to_s).to_h
      scope = params["scope"].to_s
      account = nil
      if (basic = headers["authorization"].to_s[/\ABasic (.+)\z/, 1])
        user, pass = Base64.decode64(basic).split(":", 2)
        if @users[user].nil? || @users[user] != pass
          record(user, scope, 401)
          return ["401 Unauthorized", JSON.generate("details" => "wrong username or password")]
        end
        account = user
      end
      # scope = repository:<name>:<actions>; only signed-in users get what they ask for.
      type, name, actions = scope.split(":", 3)
      access = account && type == "repository" ? [{ "type" => type, "name" => name, "actions" => actions.to_s.split(",") }] : []
      record(account, scope, 200)
      token = jwt(account, access)
      ["200 OK", JSON.generate("token" => token, "access_token" => token, "expires_in" => 600)]
    end
  end
end
